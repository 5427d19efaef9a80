"""FlashAttention-2 style tiled attention (forward + backward) and the ``attention`` entry point.

Forward (notes B(b), "FlashAttention-2 forward"): outer loop over query blocks of B_r rows, inner
loop over key blocks of B_c columns, online softmax with running max m and denominator l kept per
query block, output normalised once at the end; the logsumexp L = m + log l is saved.
Backward ("FlashAttention-2 backward"): pre-pass D = rowsum(dO o O), outer loop over key blocks with
dK_j, dV_j accumulated per block, inner loop over query blocks recomputing P = exp(S - L) per tile.

Block sizes come from the fast-memory budget M (``cache_words``, per head, in words) through
``io_model.fa2_forward_blocks`` / ``fa2_backward_blocks`` so the kernel and its I/O count use the
same tiling; the per-head on-chip footprint is asserted <= M. Default M: ``DEFAULT_CACHE_WORDS``
(131072 words = 512 KiB of fp32, a typical edge L2). All tiles are vectorised over (B, H); the
Python loop runs over tiles only. See ``reference.py`` for the shape legend and mask conventions.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor

from .io_model import DEFAULT_CACHE_WORDS, fa2_backward_blocks, fa2_forward_blocks
from .reference import MaskSpec, attention_ref, expand_kv, make_mask_spec

logger = logging.getLogger(__name__)

__all__ = ["attention", "flash_attention", "fa2_forward_footprint", "fa2_backward_footprint", "KERNELS"]

KERNELS = ("flash", "small_cache", "block_sparse", "naive")


def fa2_forward_footprint(br: int, bc: int, d: int) -> int:
    """Per-head words on chip in the FA2 forward: Q_i, O_acc (B_r d), m, l (2 B_r), K_j, V_j (2 B_c d), S (B_r B_c)."""
    return 2 * br * d + 2 * br + 2 * bc * d + br * bc


def fa2_backward_footprint(br: int, bc: int, d: int) -> int:
    """Per-head words on chip in the FA2 backward (notes B(c)): 4 B_c d + 3 B_r d + 2 B_r + 2 B_r B_c."""
    return 4 * bc * d + 3 * br * d + 2 * br + 2 * br * bc


def _spans(n: int, b: int) -> list[tuple[int, int]]:
    """[(start, stop)] of ceil(n/b) blocks; the last may be short (arbitrary lengths)."""
    return [(s, min(s + b, n)) for s in range(0, n, b)]


def _kept_tiles(spec: MaskSpec, rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> list[list[bool]]:
    """kept[i][j]: whether tile (row block i, col block j) has any unmasked entry structurally."""
    return [[not spec.tile_empty(i0, i1, j0, j1) for (j0, j1) in cols] for (i0, i1) in rows]


def tiled_forward(
    q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, scale: float, br: int, bc: int, kept: list[list[bool]] | None = None
) -> tuple[Tensor, Tensor]:
    """FA2 forward over tiles.

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D) (GQA already expanded).
        spec: masks; scale: score scale; br, bc: query/key block sizes.
        kept: optional precomputed kept[i][j] (block-sparse kernels pass it to skip blocks).

    Returns:
        o (B, H, Nq, D) and lse (B, H, Nq) with +inf on fully masked rows.
    """
    bsz, h, nq, d = q.shape
    nk = k.shape[2]
    rows, cols = _spans(nq, br), _spans(nk, bc)
    kept = kept if kept is not None else _kept_tiles(spec, rows, cols)
    o = torch.empty_like(q)
    lse = torch.empty(bsz, h, nq, dtype=q.dtype, device=q.device)
    for i, (i0, i1) in enumerate(rows):
        qi = q[:, :, i0:i1]  # (B, H, bi, D): resident for the whole inner loop
        m = torch.full((bsz, h, i1 - i0, 1), float("-inf"), dtype=q.dtype, device=q.device)
        m_safe = torch.zeros_like(m)
        l = torch.zeros_like(m)  # noqa: E741  (running softmax denominator, notes' "l")
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
            l = alpha * l + p.sum(dim=-1, keepdim=True)  # noqa: E741
            acc = alpha * acc + torch.matmul(p, v[:, :, j0:j1])
            m = m_new
        seen = l > 0  # (B, H, bi, 1); False on fully masked rows
        o[:, :, i0:i1] = acc / torch.where(seen, l, torch.ones_like(l))  # acc is 0 where nothing was seen
        lse[:, :, i0:i1] = torch.where(seen, m_safe + torch.log(torch.where(seen, l, torch.ones_like(l))), float("inf")).squeeze(-1)
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


class _FlashAttnFn(torch.autograd.Function):
    """Autograd wrapper: FA2 forward saves (q, k, v, o, lse); backward recomputes P per tile."""

    @staticmethod
    def forward(ctx, q, k, v, spec, scale, fwd_blocks, bwd_blocks, kept_fwd, kept_bwd):  # type: ignore[override]
        o, lse = tiled_forward(q, k, v, spec, scale, *fwd_blocks, kept=kept_fwd)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.spec, ctx.scale, ctx.bwd_blocks, ctx.kept_bwd = spec, scale, bwd_blocks, kept_bwd
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = tiled_backward(q, k, v, o, lse, do.contiguous(), ctx.spec, ctx.scale, *ctx.bwd_blocks, kept=ctx.kept_bwd)
        return dq, dk, dv, None, None, None, None, None, None


def flash_blocks(head_dim: int, cache_words: int | None, block_size: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
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
    q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, scale: float, *, cache_words: int | None = None, block_size: int | None = None
) -> Tensor:
    """FA2 kernel on GQA-expanded inputs q, k, v (B, H, N, D); see ``attention`` for the public API."""
    fwd, bwd = flash_blocks(q.shape[-1], cache_words, block_size)
    logger.debug("flash blocks fwd=%s bwd=%s", fwd, bwd)
    return _FlashAttnFn.apply(q, k, v, spec, scale, fwd, bwd, None, None)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel: Literal["flash", "small_cache", "block_sparse", "naive"] = "flash",
    causal: bool = False,
    attn_mask: Tensor | None = None,
    block_mask: Tensor | None = None,
    scale: float | None = None,
    cache_words: int | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Scaled dot-product attention with an I/O-aware kernel (differentiable).

    Args:
        q: (B, Hq, Nq, D) queries, float32 or float64.
        k: (B, Hkv, Nk, D) keys, Hq % Hkv == 0 (grouped-query heads share K/V).
        v: (B, Hkv, Nk, D) values.
        kernel: "flash" (FA2 tiling), "small_cache" (tiled GEMMs, for M = o(d^2)),
            "block_sparse" (FA2 over the kept blocks of ``block_mask`` only), "naive" (dense,
            input dtype, torch autograd).
        causal: causal mask aligned to the bottom-right when Nq != Nk: query i sees key j iff
            j <= i + Nk - Nq (FlashAttention's convention).
        attn_mask: bool (True = attend) or additive float; (B, Nk) key padding or
            (B|1, 1|Hq, Nq|1, Nk).
        block_mask: bool (B|1, Hq|1, ceil(Nq/b), ceil(Nk/b)); True keeps a b x b block.
        scale: score scale, default 1/sqrt(D).
        cache_words: fast-memory budget M per head in words; sets block sizes (flash:
            ``fa2_*_blocks``; small_cache: b = floor(sqrt(M/3))). Default 131072.
        block_size: override the tile size (flash, small_cache) or give the block-mask
            granularity b (block_sparse; inferred from ``block_mask`` when None, else 64).

    Returns:
        (B, Hq, Nq, D) in the dtype of q. Fully masked rows are 0 with zero gradient.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, hq, nq, d = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[-1] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, Hkv, Nk, D) matching q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cache_words is not None and cache_words < 1:
        raise ValueError(f"cache_words must be positive, got {cache_words}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nk = k.shape[2]
    if kernel == "naive":
        return attention_ref(q, k, v, causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size, scale=scale, upcast=False)
    if kernel == "block_sparse" and block_size is None and block_mask is None:
        block_size = 64
    spec = make_mask_spec(bsz, hq, nq, nk, causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size if block_mask is not None or kernel == "block_sparse" else None)
    k = expand_kv(k, hq)  # (B, Hq, Nk, D); autograd sums dk over each head group
    v = expand_kv(v, hq)
    if kernel == "flash":
        return flash_attention(q, k, v, spec, scale, cache_words=cache_words, block_size=block_size)
    if kernel == "small_cache":
        from .small_cache import small_cache_attention

        return small_cache_attention(q, k, v, spec, scale, cache_words=cache_words, tile=block_size)
    from .block_sparse import block_sparse_attention

    return block_sparse_attention(q, k, v, spec, scale, block_size=spec.block_size or block_size, cache_words=cache_words)
