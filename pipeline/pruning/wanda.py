"""Wanda (Sun et al. 2023, arXiv 2306.11695; locuslab/wanda ``lib/prune.py::prune_wanda``).

Score ``S_ij = |W_ij| * ||X_j||_2`` where ``||X_j||_2`` is the L2 norm of input feature j over all calibration
tokens; compared **within each output row** (unstructured) or within each group of M inputs (N:M).
No weight update. The repo keeps a running *mean* of squared norms; any positive rescaling of the norms leaves
every row's ranking unchanged, so the plain sum is used here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.pruning.masks import nm_mask, unstructured_mask
from pipeline.pruning.registry import MatrixInputs, QKWidthRule, register_prune_method

if TYPE_CHECKING:
    from pipeline.pruning.config import PruneConfig

__all__ = ["wanda_prune", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W| * sqrt(sum_t x_{t,j}^2)``.

    Args:
        weight: (out, in).
        input_sq_norms: (in,) sum (or mean) over calibration tokens of the squared input feature.

    Returns:
        (out, in) scores, in float32 or float64 (the wider of the inputs).
    """
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"input_sq_norms shape {tuple(input_sq_norms.shape)} does not match weight in_features {weight.shape[1]}"
        )
    dt = torch.float64 if torch.float64 in (weight.dtype, input_sq_norms.dtype) else torch.float32
    # (out, in) * (1, in): the column factor broadcasts over output rows
    return weight.abs().to(dt) * input_sq_norms.to(dt).clamp_min(0).sqrt().reshape(1, -1)


@torch.no_grad()
def wanda_prune(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, *, sparsity: float, n: int = 0, m: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight with Wanda scores.

    Args:
        weight: (out, in) matrix (not modified).
        input_sq_norms: (in,) squared input norms from calibration.
        sparsity: fraction removed in every output row (unstructured).
        n, m: keep ``n`` of every ``m`` inputs; ``n = m = 0`` means unstructured.

    Returns:
        (new_weight, keep_mask).
    """
    scores = wanda_scores(weight, input_sq_norms)
    keep = nm_mask(scores, n, m) if m else unstructured_mask(scores, sparsity, per_row=True)
    return weight * keep.to(weight.dtype), keep


@register_prune_method(
    "wanda",
    description="|W| * ||X_j|| compared within each output row",
    needs=("sq_norms",),
    qk_width_rule=QKWidthRule(activation_norms=True),
)
def _wanda_rule(weight: torch.Tensor, inputs: MatrixInputs, cfg: PruneConfig) -> torch.Tensor:
    assert inputs.sq_norms is not None  # declared in needs
    n, m = cfg.nm
    return wanda_prune(weight, inputs.sq_norms, sparsity=cfg.sparsity, n=n, m=m)[0]
