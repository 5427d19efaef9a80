"""Pruning engine: the attention-approximation method and the magnitude / Wanda / SparseGPT baselines behind one
driver (unstructured, N:M, structured: heads, FFN neurons, q/k width).

Public entry point: :func:`prune_model` with a :class:`PruneConfig`.
"""

import importlib
from typing import Any

# Lazy exports: importing a submodule such as pipeline.pruning.config (the prune stage's schema) must not
# pull in torch and transformers; the heavy modules load on first use of a name.
_EXPORTS = {
    "AttentionGeometry": "pipeline.pruning.geometry",
    "AttentionMethodConfig": "pipeline.pruning.attention_objective",
    "BlockView": "pipeline.pruning.adapters",
    "MatrixRef": "pipeline.pruning.adapters",
    "PruneConfig": "pipeline.pruning.config",
    "PruneResult": "pipeline.pruning.api",
    "QKResult": "pipeline.pruning.attention_objective",
    "QKReducedSelfAttention": "pipeline.pruning.qk_dims",
    "reduce_qk": "pipeline.pruning.qk_dims",
    "apply_mask_": "pipeline.pruning.masks",
    "attention_error": "pipeline.pruning.metrics",
    "blocks": "pipeline.pruning.adapters",
    "count_zeros": "pipeline.pruning.masks",
    "layer_output_error": "pipeline.pruning.metrics",
    "magnitude_prune": "pipeline.pruning.magnitude",
    "nm_mask": "pipeline.pruning.masks",
    "prune_model": "pipeline.pruning.api",
    "prune_qk": "pipeline.pruning.attention_objective",
    "qk_attention": "pipeline.pruning.attention_objective",
    "sparsegpt_prune": "pipeline.pruning.sparsegpt",
    "sparsity_report": "pipeline.pruning.metrics",
    "unstructured_mask": "pipeline.pruning.masks",
    "wanda_prune": "pipeline.pruning.wanda",
    "wanda_scores": "pipeline.pruning.wanda",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.pruning' has no attribute {name!r}")


__all__: list[str] = [
    "AttentionGeometry",
    "AttentionMethodConfig",
    "BlockView",
    "MatrixRef",
    "PruneConfig",
    "PruneResult",
    "QKReducedSelfAttention",
    "QKResult",
    "apply_mask_",
    "attention_error",
    "blocks",
    "count_zeros",
    "layer_output_error",
    "magnitude_prune",
    "nm_mask",
    "prune_model",
    "prune_qk",
    "qk_attention",
    "reduce_qk",
    "sparsegpt_prune",
    "sparsity_report",
    "unstructured_mask",
    "wanda_prune",
    "wanda_scores",
]
