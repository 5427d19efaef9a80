"""attention: swap the model's attention for an I/O-aware kernel (flash, small-cache) or a block-sparse one.

The PyTorch model's attention is replaced (and checked against the original); the choice travels in the
artifact so that ``export`` lowers it per target: dense kernels to the fused attention op the target's
runtime runs with its memory-efficient kernel, block-sparse to a subgraph that computes only the kept blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Optional

import numpy as np
from pydantic import Field, model_validator

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import cap_length, encode, load_from_artifact, model_max_positions, text_sets

if TYPE_CHECKING:  # torch is imported inside the functions: loading the stage registry must stay cheap
    import torch

__all__ = ["AttentionConfig", "run_attention", "block_pattern", "apply_attention_change"]


class AttentionConfig(StageConfig):
    kind = "attention"
    kernel: Literal["auto", "flash", "small_cache", "block_sparse"] = Field(
        "auto", description="auto = the planner's pick for the smallest target cache (flash or small_cache)"
    )
    block_size: int = Field(64, ge=8, le=1024, description="block-sparse block size in tokens")
    pattern: Literal["window", "causal_window", "global_window"] = Field(
        "window", description="block_sparse: window (bidirectional), causal_window (decoders), global_window (+ global blocks)"
    )
    window_blocks: int = Field(1, ge=0, description="block_sparse: neighbour key blocks kept on each allowed side")
    global_blocks: int = Field(0, ge=0, description="block_sparse: leading blocks that attend to / are attended by all")
    cache_words: Optional[int] = Field(None, ge=64, description="fast-memory words M; omitted = smallest attention cache among the targets")
    check_atol: float = Field(1e-4, gt=0, description="max |swapped - reference| on calibration text")
    check_samples: int = Field(2, ge=1, le=64, description="calibration passages for the swap check")

    @model_validator(mode="after")
    def _pattern_args(self) -> "AttentionConfig":
        if self.kernel == "block_sparse":
            if self.pattern == "window" and self.global_blocks:
                raise ValueError("pattern 'window' takes no global_blocks; use 'global_window'")
            if self.pattern == "global_window" and self.global_blocks < 1:
                raise ValueError("pattern 'global_window' needs global_blocks >= 1")
        return self


def block_pattern(change: dict[str, Any]):
    from exporters.block_sparse_graph import BlockSparsePattern

    return BlockSparsePattern(kind=change["pattern"], block=change["block_size"], window_blocks=change["window_blocks"], global_blocks=change["global_blocks"])


def _block_mask_fn(pattern):
    from exporters.block_sparse_graph import pattern_layout

    import torch

    def fn(n_q: int, n_k: int) -> "torch.Tensor":
        if n_q != n_k:
            raise ValueError(f"block-sparse attention here needs n_q == n_k (no KV cache), got {n_q} vs {n_k}")
        # (1, 1, nb, nb): the same layout the ONNX lowering computes in-graph
        return torch.from_numpy(pattern_layout(pattern, n_k))[None, None]

    return fn


def apply_attention_change(model: "torch.nn.Module", change: dict[str, Any], *, kernel: Optional[str] = None) -> int:
    """Re-apply a recorded swap to a freshly loaded model (``kernel`` overrides, e.g. "naive" as the oracle)."""
    from pipeline.kernels import swap_attention_

    k = kernel or change["kernel"]
    if change["kernel"] == "block_sparse":
        return swap_attention_(model, kernel=k, block_size=change["block_size"], block_mask_fn=_block_mask_fn(block_pattern(change)))
    return swap_attention_(model, kernel=k, cache_words=change.get("cache_words"))


def _first_out(model, batch) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**batch)
    t = out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None else out.logits
    return t.float().numpy()


@register_stage(AttentionConfig, version=2)
def run_attention(art: Artifact, cfg: AttentionConfig, ctx: StageContext) -> Artifact:
    """Swap attention, count the modules replaced, check outputs against the reference, plan I/O per target."""
    from pipeline.kernels import cache_words_from_bytes, plan_attention

    loaded = load_from_artifact(art, ctx)
    # causality is the architecture's, not the task's: a bare LlamaModel for feature-extraction is still causal
    decoder = loaded.is_decoder
    if cfg.kernel == "block_sparse" and decoder and cfg.pattern != "causal_window":
        raise StageError("attention", f"pattern '{cfg.pattern}' would let a causal decoder ({loaded.model_type}) see the future; use pattern: causal_window")
    if cfg.kernel == "block_sparse" and not decoder and cfg.pattern == "causal_window":
        raise StageError("attention", "pattern 'causal_window' is for decoders; use window or global_window for an encoder")
    conf = loaded.model.config
    window = getattr(conf, "sliding_window", None) if getattr(conf, "use_sliding_window", True) is not False else None
    limit = model_max_positions(loaded.model)
    if cfg.kernel == "block_sparse" and window and (limit is None or window < limit):
        raise StageError("attention", f"{loaded.model_type} attends through a sliding window of {window} tokens (config.json sliding_window);"
                         " the block-sparse lowering replaces the mask structure with its block pattern and cannot keep it: use kernel flash")
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    seq = cap_length(loaded, ctx.run.calibration.max_length, "calibration.max_length", ctx)
    caches = {n: cache_words_from_bytes(p.cache_bytes()) for n, p in ctx.targets.items()}
    m_words = cfg.cache_words or min(caches.values())
    plans = {n: plan_attention(cache_words=cfg.cache_words or w, seq=seq, head_dim=head_dim, causal=decoder).__dict__ for n, w in caches.items()}
    kernel = cfg.kernel
    if kernel == "auto":
        kernel = "small_cache" if plan_attention(cache_words=m_words, seq=seq, head_dim=head_dim, causal=decoder).algorithm.startswith("small") else "flash"
    change = {"kernel": kernel, "cache_words": m_words, "block_size": cfg.block_size, "pattern": cfg.pattern,
              "window_blocks": cfg.window_blocks, "global_blocks": cfg.global_blocks}

    calib, _ = text_sets(ctx)
    batch = encode(loaded, calib[: cfg.check_samples], max_length=seq, batch_size=cfg.check_samples, ctx=ctx)[0]
    dense_out = _first_out(loaded.model, batch)
    if kernel == "block_sparse":
        # the oracle for a block-sparse model is dense attention under the same block mask (float64 reference path)
        oracle = load_from_artifact(art, ctx)
        apply_attention_change(oracle.model, change, kernel="naive")
        ref_out = _first_out(oracle.model, batch)
    else:
        ref_out = dense_out
    try:
        replaced = apply_attention_change(loaded.model, change)
    except ValueError as exc:
        raise StageError("attention", str(exc)) from None
    got = _first_out(loaded.model, batch)
    mask = batch["attention_mask"].numpy().astype(bool)
    diff = float(np.abs(got - ref_out)[mask].max())
    if diff > cfg.check_atol:
        raise StageError("attention", f"swapped model differs from its reference by {diff:.3g} > check_atol {cfg.check_atol}")
    metrics: dict[str, Any] = {"kernel": kernel, "replaced": replaced, "max_abs_diff_vs_reference": diff, "cache_words": m_words, "plans": plans}
    if kernel == "block_sparse":
        from exporters.block_sparse_graph import pattern_layout

        lay = pattern_layout(block_pattern(change), seq)
        metrics["block_density"] = float(lay.mean()) if change["pattern"] != "causal_window" else float(lay.sum() / (lay.shape[0] * (lay.shape[0] + 1) / 2))
        metrics["max_abs_diff_vs_dense"] = float(np.abs(got - dense_out)[mask].max())
    ctx.metrics.update(metrics)
    return art.replace(torch_changes={**dict(art.torch_changes), "attention": change})
