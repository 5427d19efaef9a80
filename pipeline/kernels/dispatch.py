"""``attention``: the public, differentiable entry point; checks its arguments once and runs the registered kernel."""

from __future__ import annotations

import math

from torch import Tensor

from .registry import kernel_spec

__all__ = ["attention"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    kernel: str = "flash",
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
        kernel: a registered kernel (``pipeline.kernels.KERNELS``): "flash" (FA2 tiling), "small_cache" (tiled
            GEMMs, for M = o(d^2)), "block_sparse" (FA2 over the kept blocks of ``block_mask`` only), "naive"
            (dense, input dtype, torch autograd).
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

    Raises:
        ValueError: unknown kernel, shapes or dtypes that do not fit, non-positive ``cache_words``.
    """
    spec = kernel_spec(kernel)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, _, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[-1] != d:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, Hkv, Nk, D) matching q {tuple(q.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cache_words is not None and cache_words < 1:
        raise ValueError(f"cache_words must be positive, got {cache_words}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return spec.fn(
        q,
        k,
        v,
        causal=causal,
        attn_mask=attn_mask,
        block_mask=block_mask,
        scale=scale,
        cache_words=cache_words,
        block_size=block_size,
    )
