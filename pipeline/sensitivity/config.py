"""Options of the per-layer sensitivity report and of measured mixed precision (quantize and prune stages)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.schema import Frozen

__all__ = ["FidelityBudget", "PruneSensitivityOptions", "SensitivityOptions"]


class SensitivityOptions(Frozen):
    """``quantize: {sensitivity: {...}}``: quantize one unit at a time and join with ORT profiler latency."""

    granularity: Literal["matmul", "block"] = Field(
        "matmul",
        description="unit measured and kept as one: matmul = each weight node (q, k, v, o, ffn_in, ffn_out per"
        " block, each embedding table, head); block = one unit per transformer block, embeddings, head",
    )
    samples: int = Field(
        16, ge=2, description="calibration passages each one-unit model is measured on (at most calibration_samples)"
    )
    profile_runs: int = Field(3, ge=1, description="measured passes under ORT's profiler (after one warm-up pass)")
    order: Literal["sensitivity", "sensitivity_per_ms"] = Field(
        "sensitivity",
        description="mixed: auto keeps units in fp32 in this order: most sensitive first, or most sensitivity per"
        " millisecond that keeping it in fp32 costs (profiled fp32 minus quantized time of the unit)",
    )


class FidelityBudget(Frozen):
    """``quantize: {mixed: auto, budget: {...}}``: the measured fidelity the mixed model must keep."""

    min_cos_mean: float = Field(
        ...,
        gt=0.0,
        le=1.0,
        description="cosine of mean-pooled embeddings vs the dense model on calibration text, as validate's"
        " min_cos_mean (logits outputs: mean per-token cosine)",
    )


class PruneSensitivityOptions(Frozen):
    """``prune: {sensitivity: {...}}``: prune one unit at a time (the stage's own result for it) and measure."""

    granularity: Literal["matmul", "block"] = Field(
        "block",
        description="block = one transformer block at a time; matmul = one pruned matrix at a time (unstructured"
        " and n:m only: structured pruning changes shapes across matrices, so it is measured per block)",
    )
    samples: int = Field(16, ge=2, description="calibration passages each one-unit model is measured on")
