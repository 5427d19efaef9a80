"""Pruning engine: magnitude, Wanda and SparseGPT baselines (unstructured, N:M, structured) behind one driver.

Public entry point: :func:`prune_model` with a :class:`PruneConfig`.
"""

from pipeline.pruning.adapters import BlockView, MatrixRef, blocks
from pipeline.pruning.api import PruneResult, prune_model
from pipeline.pruning.attention import AttentionMethodConfig, QKResult, prune_qk, qk_attention
from pipeline.pruning.config import PruneConfig
from pipeline.pruning.geometry import AttentionGeometry
from pipeline.pruning.magnitude import magnitude_prune
from pipeline.pruning.masks import apply_mask_, count_zeros, nm_mask, unstructured_mask
from pipeline.pruning.metrics import attention_error, layer_output_error, sparsity_report
from pipeline.pruning.sparsegpt import sparsegpt_prune
from pipeline.pruning.wanda import wanda_prune, wanda_scores

__all__: list[str] = [
    "AttentionGeometry",
    "AttentionMethodConfig",
    "QKResult",
    "prune_qk",
    "qk_attention",
    "BlockView",
    "MatrixRef",
    "PruneConfig",
    "PruneResult",
    "apply_mask_",
    "attention_error",
    "blocks",
    "count_zeros",
    "layer_output_error",
    "magnitude_prune",
    "nm_mask",
    "prune_model",
    "sparsegpt_prune",
    "sparsity_report",
    "unstructured_mask",
    "wanda_prune",
    "wanda_scores",
]
