"""Block-sparse FlashAttention (FlashAttention, Dao et al. 2022, Prop. 4): FA2 tiling over kept b x b blocks only.

The query and key axes are cut into blocks of b tokens (the last block may be short). A block
(i, j) is visited only if ``block_mask[..., i, j]`` is True for at least one (batch, head) and it
is not entirely above the causal diagonal; inside a visited block the batch/heads that dropped it
are masked to -inf, so every (batch, head) gets exactly its own block pattern. Unvisited blocks
cost no compute and no I/O (``io_model.block_sparse_forward_io`` counts this schedule).
"""

from __future__ import annotations

import logging
import math

from torch import Tensor

from .flash import FA2Function, fa2_backward_footprint
from .reference import MaskSpec, tiled_inputs
from .registry import register_kernel

logger = logging.getLogger(__name__)

__all__ = ["block_sparse_attention"]


def _kept_blocks(spec: MaskSpec, nbq: int, nbk: int, b: int) -> list[list[bool]]:
    """kept[i][j] for b x b blocks: block mask (any over B, H) and causal structure."""
    if spec.block_mask is not None:
        any_bh = spec.block_mask.reshape(-1, nbq, nbk).any(dim=0).cpu().tolist()  # (nbq, nbk)
    else:
        any_bh = [[True] * nbk for _ in range(nbq)]
    kept = []
    for i in range(nbq):
        i1 = min((i + 1) * b, spec.nq)
        row = []
        for j in range(nbk):
            causal_empty = spec.causal and j * b > (i1 - 1) + spec.offset
            row.append(bool(any_bh[i][j]) and not causal_empty)
        kept.append(row)
    return kept


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, scale: float, *, block_size: int, cache_words: int | None = None
) -> Tensor:
    """Block-sparse kernel on GQA-expanded q, k, v (B, H, N, D).

    Args:
        spec: masks; ``spec.block_mask`` (B|1, H|1, ceil(Nq/b), ceil(Nk/b)) or None (dense).
        scale: score scale.
        block_size: b, the block granularity (also the tile size of both loops).
        cache_words: when given, the per-head footprint of a b x b tile is checked against it.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    d = q.shape[-1]
    if cache_words is not None and fa2_backward_footprint(block_size, block_size, d) > cache_words:
        raise ValueError(
            f"block_size={block_size} needs {fa2_backward_footprint(block_size, block_size, d)} words "
            f"on chip with head_dim={d}, more than cache_words={cache_words}"
        )
    nbq, nbk = math.ceil(spec.nq / block_size), math.ceil(spec.nk / block_size)
    kept = _kept_blocks(spec, nbq, nbk, block_size)
    logger.debug("block_sparse: %d of %d blocks visited", sum(map(sum, kept)), nbq * nbk)
    blocks = (block_size, block_size)
    return FA2Function.apply(q, k, v, spec, scale, blocks, blocks, kept, kept)


@register_kernel("block_sparse", description="FA2 over the kept b x b blocks of a block mask only", block_sparse=True)
def _block_sparse_kernel(q, k, v, *, causal, attn_mask, block_mask, scale, cache_words, block_size) -> Tensor:
    if block_size is None and block_mask is None:
        block_size = 64
    k, v, spec = tiled_inputs(q, k, v, causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size)
    return block_sparse_attention(
        q, k, v, spec, scale, block_size=spec.block_size or block_size, cache_words=cache_words
    )
