"""FlashAttention-2 style tiled attention (forward + backward), registered as kernel ``flash``.

Forward (FlashAttention-2, Dao 2023, Algorithm 1): outer loop over query blocks of B_r rows, inner
loop over key blocks of B_c columns, online softmax with running max m and denominator l kept per
query block, output normalised once at the end; the logsumexp L = m + log l is saved.
Backward (Dao 2023, Algorithm 2): pre-pass D = rowsum(dO o O), outer loop over key blocks with
dK_j, dV_j accumulated per block, inner loop over query blocks recomputing P = exp(S - L) per tile.

Block sizes come from the fast-memory budget M (``cache_words``, per head, in words) through
``io_model.fa2_forward_blocks`` / ``fa2_backward_blocks`` so the kernel and its I/O count use the
same tiling; the per-head on-chip footprint is asserted <= M. Default M: ``DEFAULT_CACHE_WORDS``
(131072 words = 512 KiB of fp32, a typical edge L2). All tiles are vectorised over (B, H); the
Python loop runs over tiles only. See ``reference.py`` for the shape legend and mask conventions.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .io_model import DEFAULT_CACHE_WORDS, fa2_backward_blocks, fa2_forward_blocks
from .reference import MaskSpec, tiled_inputs
from .registry import register_kernel

logger = logging.getLogger(__name__)

__all__ = ["FA2Function", "fa2_backward_footprint", "fa2_forward_footprint", "flash_attention", "flash_blocks"]


def fa2_forward_footprint(br: int, bc: int, d: int) -> int:
    """Per-head words on chip in the FA2 forward: Q_i, O_acc (B_r d), m, l (2 B_r), K_j, V_j (2 B_c d), S (B_r B_c)."""
    return 2 * br * d + 2 * br + 2 * bc * d + br * bc


def fa2_backward_footprint(br: int, bc: int, d: int) -> int:
    """Per-head words on chip in the FA2 backward: K_j, V_j, dK_j, dV_j (4 B_c d), Q_i, dO_i, dQ_i (3 B_r d), L_i, D_i (2 B_r), S and dS (2 B_r B_c)."""
    return 4 * bc * d + 3 * br * d + 2 * br + 2 * br * bc


def _spans(n: int, b: int) -> list[tuple[int, int]]:
    """[(start, stop)] of ceil(n/b) blocks; the last may be short (arbitrary lengths)."""
    return [(s, min(s + b, n)) for s in range(0, n, b)]


def _kept_tiles(spec: MaskSpec, rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> list[list[bool]]:
    """kept[i][j]: whether tile (row block i, col block j) has any unmasked entry structurally."""
    return [[not spec.tile_empty(i0, i1, j0, j1) for (j0, j1) in cols] for (i0, i1) in rows]


def tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: MaskSpec,
    scale: float,
    br: int,
    bc: int,
    kept: list[list[bool]] | None = None,
) -> tuple[Tensor, Tensor]:
    """FA2 forward over tiles.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D) (GQA already expanded).
        spec: masks; scale: score scale; br, bc: query/key block sizes.
        kept: optional precomputed kept[i][j] (block-sparse kernels pass it to skip blocks).

    Returns:
        o (B, H, Nq, D) and lse (B, H, Nq) with +inf on fully masked rows.
    """
    bsz, h, nq, _d = q.shape
    nk = k.shape[2]
    rows, cols = _spans(nq, br), _spans(nk, bc)
    kept = kept if kept is not None else _kept_tiles(spec, rows, cols)
    o = torch.empty_like(q)
    lse = torch.empty(bsz, h, nq, dtype=q.dtype, device=q.device)
    for i, (i0, i1) in enumerate(rows):
        qi = q[:, :, i0:i1]  # (B, H, bi, D): resident for the whole inner loop
        m = torch.full((bsz, h, i1 - i0, 1), float("-inf"), dtype=q.dtype, device=q.device)
        m_safe = torch.zeros_like(m)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qi)
        for j, (j0, j1) in enumerate(cols):
            if not kept[i][j]:
                continue
            s = torch.matmul(qi, k[:, :, j0:j1].transpose(-1, -2)) * scale  # (B, H, bi, bj)
            s = spec.apply(s, i0, i1, j0, j1)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # rows with nothing seen yet: no NaN
            p = torch.exp(s - m_safe)  # (B, H, bi, bj)
            alpha = torch.exp(m - m_safe)  # rescales the old statistics; 0 when m = -inf
            l = alpha * l + p.sum(dim=-1, keepdim=True)
            acc = alpha * acc + torch.matmul(p, v[:, :, j0:j1])
            m = m_new
        seen = l > 0  # (B, H, bi, 1); False on fully masked rows
        o[:, :, i0:i1] = acc / torch.where(seen, l, torch.ones_like(l))  # acc is 0 where nothing was seen
        lse[:, :, i0:i1] = torch.where(
            seen, m_safe + torch.log(torch.where(seen, l, torch.ones_like(l))), float("inf")
        ).squeeze(-1)
    return o, lse


def tiled_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    spec: MaskSpec,
    scale: float,
    br: int,
    bc: int,
    kept: list[list[bool]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """FA2 backward over tiles: dq, dk, dv with the shapes of q, k, v (B, H, N, D)."""
    nq, nk = q.shape[2], k.shape[2]
    rows, cols = _spans(nq, br), _spans(nk, bc)
    kept = kept if kept is not None else _kept_tiles(spec, rows, cols)
    delta = (do * o).sum(dim=-1, keepdim=True)  # (B, H, Nq, 1): D = rowsum(dO o O), the pre-pass
    lse = lse.unsqueeze(-1)  # (B, H, Nq, 1)
    dq = torch.zeros_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    for j, (j0, j1) in enumerate(cols):
        kj, vj = k[:, :, j0:j1], v[:, :, j0:j1]  # (B, H, bj, D): resident with dK_j, dV_j
        dkj = torch.zeros_like(kj)
        dvj = torch.zeros_like(vj)
        for i, (i0, i1) in enumerate(rows):
            if not kept[i][j]:
                continue
            qi, doi = q[:, :, i0:i1], do[:, :, i0:i1]
            s = torch.matmul(qi, kj.transpose(-1, -2)) * scale  # (B, H, bi, bj)
            s = spec.apply(s, i0, i1, j0, j1)
            p = torch.exp(s - lse[:, :, i0:i1])  # exact softmax probabilities; 0 on masked rows (L = +inf)
            dvj += torch.matmul(p.transpose(-1, -2), doi)
            dp = torch.matmul(doi, vj.transpose(-1, -2))  # (B, H, bi, bj)
            ds = p * (dp - delta[:, :, i0:i1])
            dq[:, :, i0:i1] += torch.matmul(ds, kj) * scale
            dkj += torch.matmul(ds.transpose(-1, -2), qi) * scale
        dk[:, :, j0:j1] = dkj
        dv[:, :, j0:j1] = dvj
    return dq, dk, dv


class FA2Function(torch.autograd.Function):
    """Autograd wrapper: FA2 forward saves (q, k, v, o, lse); backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, v, spec, scale, fwd_blocks, bwd_blocks, kept_fwd, kept_bwd):
        o, lse = tiled_forward(q, k, v, spec, scale, *fwd_blocks, kept=kept_fwd)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spec, ctx.scale, ctx.bwd_blocks, ctx.kept_bwd = spec, scale, bwd_blocks, kept_bwd
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = tiled_backward(
            q, k, v, o, lse, do.contiguous(), ctx.spec, ctx.scale, *ctx.bwd_blocks, kept=ctx.kept_bwd
        )
        return dq, dk, dv, None, None, None, None, None, None


def flash_blocks(
    head_dim: int, cache_words: int | None, block_size: int | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((B_r, B_c) forward, (B_r, B_c) backward) for the flash kernel, footprints checked against M.

    Args:
        head_dim: d.
        cache_words: M per head; ``DEFAULT_CACHE_WORDS`` when None.
        block_size: square tiles override; checked against M only when ``cache_words`` is given.
    """
    m = DEFAULT_CACHE_WORDS if cache_words is None else cache_words
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        fwd = bwd = (block_size, block_size)
        if cache_words is not None and fa2_backward_footprint(block_size, block_size, head_dim) > m:
            raise ValueError(
                f"block_size={block_size} needs {fa2_backward_footprint(block_size, block_size, head_dim)} "
                f"words on chip with head_dim={head_dim}, more than cache_words={m}"
            )
        return fwd, bwd
    fwd, bwd = fa2_forward_blocks(m, head_dim), fa2_backward_blocks(m, head_dim)
    assert fa2_forward_footprint(*fwd, head_dim) <= m, (fwd, m)
    assert fa2_backward_footprint(*bwd, head_dim) <= m, (bwd, m)
    return fwd, bwd


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    spec: MaskSpec,
    scale: float,
    *,
    cache_words: int | None = None,
    block_size: int | None = None,
) -> Tensor:
    """FA2 kernel on GQA-expanded inputs q, k, v (B, H, N, D); see ``attention`` for the public API."""
    fwd, bwd = flash_blocks(q.shape[-1], cache_words, block_size)
    logger.debug("flash blocks fwd=%s bwd=%s", fwd, bwd)
    return FA2Function.apply(q, k, v, spec, scale, fwd, bwd, None, None)


@register_kernel("flash", description="FA2 tiling sized from the fast-memory budget (optimal for M >= ~d^2)")
def _flash_kernel(q, k, v, *, causal, attn_mask, block_mask, scale, cache_words, block_size) -> Tensor:
    k, v, spec = tiled_inputs(
        q,
        k,
        v,
        causal=causal,
        attn_mask=attn_mask,
        block_mask=block_mask,
        block_size=block_size if block_mask is not None else None,
    )
    return flash_attention(q, k, v, spec, scale, cache_words=cache_words, block_size=block_size)
