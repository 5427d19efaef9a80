"""attention: swap the model's attention for an I/O-aware kernel (flash, small-cache) or a block-sparse one.

The PyTorch model's attention is replaced (and checked against the original); the choice travels in the
artifact so that ``export`` lowers it per target: dense kernels to the fused attention op the target's
runtime runs with its memory-efficient kernel, block-sparse to a subgraph that computes only the kept blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import cap_length, encode, load_from_artifact, model_max_positions, text_sets

if TYPE_CHECKING:  # torch is imported inside the functions: loading the stage registry must stay cheap
    pass

__all__ = ["AttentionConfig", "run_attention"]


class AttentionConfig(StageConfig):
    kind = "attention"
    works_on = "torch"
    kernel: str = Field(
        "auto",
        description="a registered kernel (pipeline.kernels.stage_kernels()), or auto = the planner's pick for the smallest target cache (flash or small_cache)",
    )
    block_size: int = Field(64, ge=8, le=1024, description="block-sparse block size in tokens")
    pattern: Literal["window", "causal_window", "global_window"] = Field(
        "window",
        description="block_sparse: window (bidirectional), causal_window (decoders), global_window (+ global blocks)",
    )
    window_blocks: int = Field(1, ge=0, description="block_sparse: neighbour key blocks kept on each allowed side")
    global_blocks: int = Field(0, ge=0, description="block_sparse: leading blocks that attend to / are attended by all")
    cache_words: int | None = Field(
        None, ge=64, description="fast-memory words M; omitted = smallest attention cache among the targets"
    )
    check_atol: float = Field(1e-4, gt=0, description="max |swapped - reference| on calibration text")
    check_samples: int = Field(2, ge=1, le=64, description="calibration passages for the swap check")

    @field_validator("kernel")
    @classmethod
    def _registered_kernel(cls, v: str) -> str:
        from pipeline.kernels import stage_kernels

        allowed = ["auto", *stage_kernels()]
        if v not in allowed:
            raise ValueError(f"unknown kernel {v!r}; expected one of: {', '.join(allowed)}")
        return v

    def causality_problem(self, causal: bool, model_type: str = "") -> str | None:
        """Why this config cannot serve a causal (or a bidirectional) model, or None. Causality is the
        architecture's, not the task's: a bare LlamaModel used for feature-extraction is still causal."""
        block_sparse = self.kernel != "auto" and _is_block_sparse(self.kernel)
        if block_sparse and causal and self.pattern != "causal_window":
            who = f"a causal decoder ({model_type})" if model_type else "a causal decoder"
            return f"pattern '{self.pattern}' would let {who} see the future; use pattern: causal_window"
        if block_sparse and not causal and self.pattern == "causal_window":
            return "pattern 'causal_window' is for decoders; use window or global_window for an encoder"
        return None

    def check(self, plan: RunPlan) -> None:
        from pipeline.models import is_causal_family

        problem = self.causality_problem(is_causal_family(plan.family))
        if problem:
            raise ValueError(problem)

    @model_validator(mode="after")
    def _pattern_args(self) -> AttentionConfig:
        if self.kernel != "auto" and _is_block_sparse(self.kernel):
            if self.pattern == "window" and self.global_blocks:
                raise ValueError("pattern 'window' takes no global_blocks; use 'global_window'")
            if self.pattern == "global_window" and self.global_blocks < 1:
                raise ValueError("pattern 'global_window' needs global_blocks >= 1")
        return self


def _is_block_sparse(kernel: str) -> bool:
    from pipeline.kernels import kernel_spec

    return kernel_spec(kernel).block_sparse


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
    from pipeline.kernels.change import AttentionChange, apply_attention_change
    from pipeline.kernels.patterns import pattern_layout

    loaded = load_from_artifact(art, ctx)
    decoder = loaded.is_decoder
    problem = cfg.causality_problem(decoder, loaded.model_type)
    if problem:  # preflight() refuses this before any stage runs; direct callers get the same message
        raise StageError("attention", problem)
    conf = loaded.model.config
    window = getattr(conf, "sliding_window", None) if getattr(conf, "use_sliding_window", True) is not False else None
    limit = model_max_positions(loaded.model)
    if cfg.kernel == "block_sparse" and window and (limit is None or window < limit):
        raise StageError(
            "attention",
            f"{loaded.model_type} attends through a sliding window of {window} tokens (config.json sliding_window);"
            " the block-sparse lowering replaces the mask structure with its block pattern and cannot keep it: use kernel flash",
        )
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // conf.num_attention_heads
    seq = cap_length(loaded, ctx.run.calibration.max_length, "calibration.max_length", ctx)
    caches = {n: cache_words_from_bytes(p.cache_bytes()) for n, p in ctx.targets.items()}
    m_words = cfg.cache_words or min(caches.values())
    plans = {
        n: plan_attention(cache_words=cfg.cache_words or w, seq=seq, head_dim=head_dim, causal=decoder).__dict__
        for n, w in caches.items()
    }
    kernel = cfg.kernel
    if kernel == "auto":
        kernel = (
            "small_cache"
            if plan_attention(cache_words=m_words, seq=seq, head_dim=head_dim, causal=decoder).algorithm.startswith(
                "small"
            )
            else "flash"
        )
    change = AttentionChange(kernel, m_words, cfg.block_size, cfg.pattern, cfg.window_blocks, cfg.global_blocks)

    calib, _ = text_sets(ctx)
    batch = encode(loaded, calib[: cfg.check_samples], max_length=seq, batch_size=cfg.check_samples, ctx=ctx)[0]
    dense_out = _first_out(loaded.model, batch)
    if change.block_sparse:
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
        raise StageError(
            "attention", f"swapped model differs from its reference by {diff:.3g} > check_atol {cfg.check_atol}"
        )
    metrics: dict[str, Any] = {
        "kernel": kernel,
        "replaced": replaced,
        "max_abs_diff_vs_reference": diff,
        "cache_words": m_words,
        "plans": plans,
    }
    if change.block_sparse:
        lay = pattern_layout(change.block_pattern, seq)
        metrics["block_density"] = (
            float(lay.mean())
            if change.pattern != "causal_window"
            else float(lay.sum() / (lay.shape[0] * (lay.shape[0] + 1) / 2))
        )
        metrics["max_abs_diff_vs_dense"] = float(np.abs(got - dense_out)[mask].max())
    ctx.metrics.update(metrics)
    return art.replace(torch_changes={**dict(art.torch_changes), "attention": change.to_record()})
