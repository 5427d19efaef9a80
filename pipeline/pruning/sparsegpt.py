"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774; IST-DASLab/sparsegpt ``sparsegpt.py::fasterprune``).

OBS-style one-shot pruning with weight reconstruction for ``y = x W^T``: with ``H = (2/N) sum_t x_t x_t^T``
(the layer-input Hessian), sweep columns in blocks of ``blocksize``; inside a block choose the mask by
``w^2 / [U]_jj^2`` (U = upper Cholesky factor of H^-1), zero the pruned weights column by column and spread
their error onto the later columns of the block; after the block apply the lazy update to all later columns.

Deviations from the reference, both for exactness of the requested density:
* per block, exactly ``k_b`` entries are pruned with ``k_b`` taken from a cumulative rounding of
  ``sparsity * numel`` (the reference's ``tmp <= sort(tmp)[int(s*numel)]`` prunes one extra entry and more
  under ties), so the whole matrix ends with exactly ``floor(sparsity * out * in)`` zeros selected;
* N:M uses the standard "keep n of every m" meaning (the reference's ``prunen`` is the number *removed*,
  identical for 2:4 and 4:8).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from pipeline.pruning.masks import num_pruned
from pipeline.pruning.registry import MatrixInputs, register_prune_method

if TYPE_CHECKING:
    from pipeline.pruning.config import PruneConfig

__all__ = ["hessian_from_inputs", "sparsegpt_prune"]

logger = logging.getLogger(__name__)


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = (2/N) X^T X`` for inputs ``x`` of shape (N, in) (float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 * x.t() @ x / max(x.shape[0], 1)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune and reconstruct one (out, in) weight.

    Args:
        weight: (out, in) matrix (not modified).
        hessian: (in, in) ``2/N X^T X`` of the layer inputs.
        sparsity: fraction removed (unstructured); ignored when ``m`` is set.
        n, m: keep ``n`` of every ``m`` consecutive inputs per row; ``n = m = 0`` means unstructured.
        blocksize: column block width of the lazy updates.
        percdamp: dampening ``percdamp * mean(diag H)`` added to the diagonal.

    Returns:
        (new_weight (out, in) in ``weight.dtype``, keep_mask (out, in) bool). Pruned entries are exactly 0.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} != ({cols}, {cols}) for weight {tuple(weight.shape)}")
    if m and not (0 < n < m):
        raise ValueError(f"n:m needs 0 < n < m, got n={n!r}, m={m!r}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize!r}")
    if m:
        blocksize = max(m, blocksize // m * m)  # N:M groups must not straddle a block boundary
    # float64 problems stay float64 (oracle tests); everything else runs in float32 like the reference.
    dt = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dt).clone(memory_format=torch.contiguous_format)  # (out, in)
    H = hessian.detach().to(dt).clone(memory_format=torch.contiguous_format)  # (in, in)

    dead = torch.diag(H) == 0  # inputs that never fire carry no information: zero their weights
    H[dead, dead] = 1
    W[:, dead] = 0

    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(cols, dtype=dt, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # U with H^-1 = U^T U

    prune = torch.zeros((rows, cols), dtype=torch.bool, device=W.device)
    total_k = num_pruned(rows * cols, sparsity) if not m else 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)  # (count,)

        if not m:
            # cumulative rounding: blocks together prune exactly total_k entries
            k_b = math.floor(total_k * i2 / cols) - math.floor(total_k * i1 / cols)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k_b:
                tmp = W1**2 / d1.reshape(1, -1) ** 2  # OBS saliency w^2 / U_jj^2, (out, count)
                idx = torch.sort(tmp.flatten(), stable=True).indices[:k_b]
                mask1.view(-1)[idx] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if m and (i1 + i) % m == 0:
                # choose this group's mask on the *updated* weights (as the reference does)
                g = min(m, count - i)
                n_keep = math.ceil(n * g / m)
                tmp = W1[:, i : i + g] ** 2 / d1[i : i + g].reshape(1, -1) ** 2
                low = torch.sort(tmp, dim=1, stable=True).indices[:, : g - n_keep]  # (out, g - n_keep)
                mask1[:, i : i + g].scatter_(1, low, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            # (out, 1) x (1, count - i): spread this column's error onto the rest of the block
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        prune[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # lazy batch update of all later columns

    W[prune] = 0  # exact zeros (Q1 already has them; this guards against -0.0 / fp noise)
    return W.to(weight.dtype), ~prune


@register_prune_method(
    "sparsegpt",
    description="OBS mask choice and reconstruction from the input Hessian",
    needs=("hessian",),
    reconstructs=True,
)
def _sparsegpt_rule(weight: torch.Tensor, inputs: MatrixInputs, cfg: PruneConfig) -> torch.Tensor:
    assert inputs.hessian is not None  # declared in needs
    n, m = cfg.nm
    return sparsegpt_prune(
        weight, inputs.hessian, sparsity=cfg.sparsity, n=n, m=m, blocksize=cfg.blocksize, percdamp=cfg.percdamp
    )[0]
