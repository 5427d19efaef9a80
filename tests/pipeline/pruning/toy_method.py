"""A toy pruning method for the registry test: one file plus one registration.

Score ``|W_ij| * sum_t x_{t,j}^2`` (input energy, not its square root as Wanda), compared within each output row.
"""

from __future__ import annotations

import torch

from pipeline.pruning.masks import unstructured_mask
from pipeline.pruning.registry import MatrixInputs, register_prune_method

CALLS: list[tuple[int, int]] = []  # (out, in) of every matrix the rule pruned


@register_prune_method("toy_energy", description="|W| * input energy per row (test)", needs=("sq_norms",))
def toy_energy(weight: torch.Tensor, inputs: MatrixInputs, cfg) -> torch.Tensor:
    assert inputs.sq_norms is not None and inputs.hessian is None  # exactly what was declared
    CALLS.append(tuple(weight.shape))
    scores = weight.abs().double() * inputs.sq_norms.double().reshape(1, -1)  # (out, in) * (1, in)
    return weight * unstructured_mask(scores, cfg.sparsity, per_row=True).to(weight.dtype)
