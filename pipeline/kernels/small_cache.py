"""Small-cache attention ("Fine-grained Attention I/O Complexity", its small-cache Algorithm 6: wins when M = o(d^2)): every product is a tiled GEMM.

For M = o(d^2) a FlashAttention tile cannot hold a useful number of d-wide rows, so the algorithm
of Li et al. (arXiv 2410.09397, "Algorithm 6" in v2) computes attention through matrix products
with b x b tiles, b = floor(sqrt(M / 3)) (A tile, B tile and C accumulator fit in M), and keeps
the n x n intermediates (S, P, dP, dS) in slow memory (here: ordinary tensors).

Forward: S = scale Q K^T (tiled), masked row softmax with L = logsumexp saved, O = P V (tiled).
Backward: S recomputed (tiled), P = exp(S - L), dV = P^T dO, dP = dO V^T, D = rowsum(dO o O),
dS = P o (dP - D), dQ = scale dS K, dK = scale dS^T Q (all tiled). I/O counts of exactly this
schedule: ``io_model.small_cache_forward_io`` / ``small_cache_backward_io``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .io_model import DEFAULT_CACHE_WORDS, small_cache_tile
from .reference import MaskSpec, tiled_inputs
from .registry import register_kernel

logger = logging.getLogger(__name__)

__all__ = ["small_cache_attention", "tiled_matmul"]


def tiled_matmul(a: Tensor, b: Tensor, tile: int) -> Tensor:
    """C = A B computed tile by tile: for each (i, j) output tile, accumulate over k-tiles.

    Args:
        a: (..., p, q).
        b: (..., q, r), same leading (batch/head) dims as ``a``.
        tile: side of the square tiles (the last tiles may be short).

    Returns:
        (..., p, r).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    p, q = a.shape[-2:]
    r = b.shape[-1]
    out = torch.empty(*a.shape[:-2], p, r, dtype=a.dtype, device=a.device)
    for i0 in range(0, p, tile):
        i1 = min(i0 + tile, p)
        for j0 in range(0, r, tile):
            j1 = min(j0 + tile, r)
            acc = torch.zeros(*a.shape[:-2], i1 - i0, j1 - j0, dtype=a.dtype, device=a.device)  # C tile on chip
            for k0 in range(0, q, tile):
                k1 = min(k0 + tile, q)
                acc += torch.matmul(a[..., i0:i1, k0:k1], b[..., k0:k1, j0:j1])  # A_ik B_kj
            out[..., i0:i1, j0:j1] = acc
    return out


def _scores(q: Tensor, k: Tensor, spec: MaskSpec, scale: float, tile: int) -> Tensor:
    """(B, H, Nq, Nk) masked scores, -inf where masked."""
    s = tiled_matmul(q, k.transpose(-1, -2), tile) * scale
    return spec.apply(s, 0, spec.nq, 0, spec.nk)


class _SmallCacheFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec, scale, tile):
        s = _scores(q, k, spec, scale, tile)  # (B, H, Nq, Nk) in slow memory
        m = s.amax(dim=-1, keepdim=True)
        m = m.masked_fill(torch.isneginf(m), 0.0)  # fully masked rows: avoid -inf - -inf
        l = torch.exp(s - m).sum(dim=-1, keepdim=True)
        seen = l > 0
        lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), float("inf"))  # (B, H, Nq, 1)
        p = torch.exp(s - lse)  # rows with L = +inf are 0
        del s
        o = tiled_matmul(p, v, tile)  # (B, H, Nq, D)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spec, ctx.scale, ctx.tile = spec, scale, tile
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        spec, scale, tile = ctx.spec, ctx.scale, ctx.tile
        do = do.contiguous()
        p = torch.exp(_scores(q, k, spec, scale, tile) - lse)  # (B, H, Nq, Nk), recomputed
        dv = tiled_matmul(p.transpose(-1, -2), do, tile)  # (B, H, Nk, D)
        dp = tiled_matmul(do, v.transpose(-1, -2), tile)  # (B, H, Nq, Nk)
        delta = (do * o).sum(dim=-1, keepdim=True)  # (B, H, Nq, 1)
        ds = p * (dp - delta)
        del p, dp
        dq = tiled_matmul(ds, k, tile) * scale  # (B, H, Nq, D)
        dk = tiled_matmul(ds.transpose(-1, -2), q, tile) * scale  # (B, H, Nk, D)
        return dq, dk, dv, None, None, None


def small_cache_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: MaskSpec,
    scale: float,
    *,
    cache_words: int | None = None,
    tile: int | None = None,
) -> Tensor:
    """Small-cache kernel on GQA-expanded q, k, v (B, H, N, D).

    Args:
        spec: masks (see ``reference.make_mask_spec``); scale: score scale.
        cache_words: M per head; tile b = floor(sqrt(M/3)); default ``DEFAULT_CACHE_WORDS``.
        tile: explicit b (checked 3 b^2 <= M when ``cache_words`` is given).
    """
    m = DEFAULT_CACHE_WORDS if cache_words is None else cache_words
    if tile is None:
        tile = small_cache_tile(m)
    elif cache_words is not None and 3 * tile * tile > m:
        raise ValueError(f"tile={tile} needs 3*tile^2={3 * tile * tile} words, more than cache_words={m}")
    assert 3 * tile * tile <= m or cache_words is None
    return _SmallCacheFn.apply(q, k, v, spec, scale, tile)


@register_kernel("small_cache", description="tiled GEMMs with b = floor(sqrt(M/3)) (optimal for M = o(d^2))")
def _small_cache_kernel(q, k, v, *, causal, attn_mask, block_mask, scale, cache_words, block_size) -> Tensor:
    k, v, spec = tiled_inputs(
        q,
        k,
        v,
        causal=causal,
        attn_mask=attn_mask,
        block_mask=block_mask,
        block_size=block_size if block_mask is not None else None,
    )
    return small_cache_attention(q, k, v, spec, scale, cache_words=cache_words, tile=block_size)
