"""Block-mask builders for ``attention(kernel="block_sparse")``.

All builders return bool tensors of shape (1, 1, n_blocks_q, n_blocks_k) (broadcast over batch and
heads; True = block kept). When n_blocks_q != n_blocks_k the block diagonal is aligned to the
bottom-right like the token-level causal mask: query block i is "on the diagonal" with key block
``i + (n_blocks_k - n_blocks_q)``. Combine builders with ``|`` and ``&``.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["density", "dilated", "from_token_mask", "global_tokens", "random_blocks", "sliding_window"]


def _check_blocks(n_blocks_q: int, n_blocks_k: int) -> None:
    if n_blocks_q < 1 or n_blocks_k < 1:
        raise ValueError(f"block counts must be >= 1, got ({n_blocks_q}, {n_blocks_k})")


def _rel(n_blocks_q: int, n_blocks_k: int) -> Tensor:
    """(nbq, nbk) signed distance (i + nbk - nbq) - j of key block j behind query block i."""
    i = torch.arange(n_blocks_q).unsqueeze(1) + (n_blocks_k - n_blocks_q)
    j = torch.arange(n_blocks_k).unsqueeze(0)
    return i - j


def sliding_window(n_blocks_q: int, n_blocks_k: int, window: int, causal: bool = False) -> Tensor:
    """Keep key blocks within ``window`` blocks of the diagonal (behind it only when causal).

    Args:
        n_blocks_q: ceil(Nq / b); n_blocks_k: ceil(Nk / b).
        window: blocks kept on each side (>= 0; 0 keeps the diagonal only).
        causal: keep only 0 <= distance <= window.
    """
    _check_blocks(n_blocks_q, n_blocks_k)
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    rel = _rel(n_blocks_q, n_blocks_k)
    keep = (rel >= 0) & (rel <= window) if causal else rel.abs() <= window
    return keep[None, None]


def global_tokens(n_blocks_q: int, n_blocks_k: int, n_global: int, causal: bool = False) -> Tensor:
    """The first ``n_global`` blocks are global: every query block sees them and they see every key block.

    Args:
        n_global: number of leading global blocks (>= 0).
        causal: drop blocks strictly above the block diagonal.
    """
    _check_blocks(n_blocks_q, n_blocks_k)
    if n_global < 0:
        raise ValueError(f"n_global must be >= 0, got {n_global}")
    keep = torch.zeros(n_blocks_q, n_blocks_k, dtype=torch.bool)
    keep[:, :n_global] = True  # everyone attends to the global key blocks
    keep[:n_global, :] = True  # global query blocks attend to everything
    if causal:
        keep &= _rel(n_blocks_q, n_blocks_k) >= 0
    return keep[None, None]


def dilated(n_blocks_q: int, n_blocks_k: int, dilation: int, causal: bool = False) -> Tensor:
    """Keep key blocks whose distance to the diagonal is a multiple of ``dilation`` (>= 1)."""
    _check_blocks(n_blocks_q, n_blocks_k)
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    rel = _rel(n_blocks_q, n_blocks_k)
    keep = rel.remainder(dilation) == 0
    if causal:
        keep &= rel >= 0
    return keep[None, None]


def random_blocks(
    n_blocks_q: int, n_blocks_k: int, density: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Each block kept independently with probability ``density`` (in [0, 1])."""
    _check_blocks(n_blocks_q, n_blocks_k)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return (torch.rand(n_blocks_q, n_blocks_k, generator=generator) < density)[None, None]


def from_token_mask(token_mask: Tensor, block_size: int) -> Tensor:
    """Coarsen a token mask to blocks: a block is kept if any of its tokens is kept.

    Args:
        token_mask: bool (..., Nq, Nk), True = attend; leading dims are kept (1-D/2-D gets (1, 1, ...)).
        block_size: b.

    Returns:
        bool (..., ceil(Nq/b), ceil(Nk/b)), 4-D.
    """
    if token_mask.dtype != torch.bool:
        raise ValueError(f"token_mask must be bool, got {token_mask.dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tm = token_mask
    while tm.dim() < 4:
        tm = tm.unsqueeze(0)
    nq, nk = tm.shape[-2:]
    pad_q, pad_k = math.ceil(nq / block_size) * block_size - nq, math.ceil(nk / block_size) * block_size - nk
    x = F.pad(tm.to(torch.float32), (0, pad_k, 0, pad_q))  # padding tokens count as masked
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])  # (L, 1, Nq', Nk') for max_pool2d
    pooled = F.max_pool2d(x, kernel_size=block_size, stride=block_size)
    return pooled.reshape(*lead, *pooled.shape[-2:]) > 0


def density(block_mask: Tensor) -> float:
    """Fraction of kept blocks (over all batch/head entries)."""
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool, got {block_mask.dtype}")
    return float(block_mask.float().mean())
