"""Magnitude pruning baseline: score |W|.

Granularity follows the magnitude baseline of locuslab/wanda (``lib/prune.py::prune_magnitude``): unstructured
sparsity compares |W| over the **whole matrix** (layer-wise), while N:M compares within each group of M
consecutive input columns of each row. No weight update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.pruning.masks import nm_mask, unstructured_mask
from pipeline.pruning.registry import MatrixInputs, QKWidthRule, register_prune_method

if TYPE_CHECKING:
    from pipeline.pruning.config import PruneConfig

__all__ = ["magnitude_prune", "magnitude_scores"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| for an (out, in) weight."""
    return weight.abs()


@torch.no_grad()
def magnitude_prune(
    weight: torch.Tensor, *, sparsity: float, n: int = 0, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight by magnitude.

    Args:
        weight: (out, in) matrix (not modified).
        sparsity: fraction removed over the whole matrix (unstructured; ignored when ``n, m`` are set).
        n, m: keep ``n`` of every ``m`` consecutive inputs; ``n = m = 0`` means unstructured.

    Returns:
        (new_weight, keep_mask), both (out, in).
    """
    scores = magnitude_scores(weight)
    keep = nm_mask(scores, n, m) if m else unstructured_mask(scores, sparsity, per_row=False)
    return weight * keep.to(weight.dtype), keep


@register_prune_method(
    "magnitude",
    description="|W| over the whole matrix (N:M: within each group); no calibration text",
    qk_width_rule=QKWidthRule(),  # weight-row norms
)
def _magnitude_rule(weight: torch.Tensor, inputs: MatrixInputs, cfg: PruneConfig) -> torch.Tensor:
    n, m = cfg.nm
    return magnitude_prune(weight, sparsity=cfg.sparsity, n=n, m=m)[0]
