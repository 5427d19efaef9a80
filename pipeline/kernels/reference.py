"""Dense attention oracle and the mask conventions shared by every kernel.

Shape legend (used throughout ``pipeline.kernels``):
    B   batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0, grouped-query attention),
    Nq  query length, Nk key length, D head dimension, b block size of a block mask.

Mask conventions (identical for ``attention_ref`` and all tiled kernels):
    * ``attn_mask`` bool: True = attend. Shapes (B|1, 1|Hq, Nq|1, Nk) or (B, Nk) key padding.
    * ``attn_mask`` float: additive bias with the same shapes (use ``-inf`` to mask).
    * ``causal``: query i may see key j iff ``j <= i + (Nk - Nq)``, i.e. the causal diagonal is
      aligned to the bottom-right corner as in FlashAttention (the last query sees every key).
      With Nq > Nk the first ``Nq - Nk`` query rows see nothing.
    * ``block_mask`` bool (B|1, Hq|1, ceil(Nq/b), ceil(Nk/b)): True = the b x b block is kept.
    * A row whose scores are all ``-inf`` (fully masked) returns 0 and has zero gradient, like
      ONNX Runtime's Attention operator (a plain softmax would give NaN).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .registry import register_kernel

logger = logging.getLogger(__name__)

__all__ = ["MaskSpec", "attention_ref", "expand_kv", "make_mask_spec", "masked_softmax", "tiled_inputs"]


def expand_kv(k: Tensor, hq: int) -> Tensor:
    """Repeat key/value heads for grouped-query attention.

    Args:
        k: (B, Hkv, Nk, D) keys or values.
        hq: number of query heads; must be a multiple of Hkv.

    Returns:
        (B, Hq, Nk, D); head h of the result is head ``h // (Hq // Hkv)`` of ``k`` (the
        convention of HF ``repeat_kv``). Autograd sums the gradient over each group.
    """
    hkv = k.shape[1]
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if hq == hkv:
        return k
    return k.repeat_interleave(hq // hkv, dim=1)


@dataclass(frozen=True)
class MaskSpec:
    """Normalised masks for a (B, Hq, Nq, Nk) score tensor, sliceable per tile.

    Attributes:
        nq: query length Nq.
        nk: key length Nk.
        causal: bottom-right aligned causal mask (see module docstring).
        keep: bool (B|1, Hq|1, Nq|1, Nk) token mask, True = attend, or None.
        bias: float (B|1, Hq|1, Nq|1, Nk) additive bias, or None.
        block_mask: bool (B|1, Hq|1, ceil(Nq/b), ceil(Nk/b)), or None.
        block_size: b, required with ``block_mask``.
    """

    nq: int
    nk: int
    causal: bool = False
    keep: Tensor | None = None
    bias: Tensor | None = None
    block_mask: Tensor | None = None
    block_size: int | None = None

    @property
    def offset(self) -> int:
        """Nk - Nq: query i sees keys j <= i + offset under the causal mask."""
        return self.nk - self.nq

    def tile_empty(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """True when the tile rows [i0, i1) x cols [j0, j1) is masked out entirely (skippable).

        Only structural masks are used (causal, block mask); token masks never skip a tile.
        """
        if self.causal and j0 > (i1 - 1) + self.offset:
            return True  # every key of the tile lies to the right of the causal diagonal
        if self.block_mask is not None:
            b = self.block_size
            assert b is not None
            sub = self.block_mask[..., i0 // b : (i1 - 1) // b + 1, j0 // b : (j1 - 1) // b + 1]
            if not bool(sub.any()):
                return True
        return False

    def tile(self, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """Masks of one tile, broadcastable to (B, Hq, i1-i0, j1-j0).

        Returns:
            (keep, bias): keep is bool (True = attend) or None when every entry is kept;
            bias is an additive float tensor or None.
        """
        keep: Tensor | None = None
        if self.causal and (j1 - 1) > i0 + self.offset:  # part of the tile is above the diagonal
            qi = torch.arange(i0, i1, device=device).unsqueeze(1)  # (bi, 1)
            kj = torch.arange(j0, j1, device=device).unsqueeze(0)  # (1, bj)
            keep = kj <= qi + self.offset  # (bi, bj)
        if self.keep is not None:
            rows = slice(i0, i1) if self.keep.shape[-2] > 1 else slice(None)
            km = self.keep[..., rows, j0:j1]
            keep = km if keep is None else (keep & km)
        if self.block_mask is not None:
            b = self.block_size
            assert b is not None
            rb = torch.arange(i0, i1, device=device) // b  # (bi,) block row of each query
            cb = torch.arange(j0, j1, device=device) // b  # (bj,) block column of each key
            bm = self.block_mask.index_select(-2, rb).index_select(-1, cb)  # (B|1, H|1, bi, bj)
            keep = bm if keep is None else (keep & bm)
        bias: Tensor | None = None
        if self.bias is not None:
            rows = slice(i0, i1) if self.bias.shape[-2] > 1 else slice(None)
            bias = self.bias[..., rows, j0:j1]
        return keep, bias

    def apply(self, s: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """Mask a score tile s (B, Hq, i1-i0, j1-j0): add the bias, then set dropped entries to -inf."""
        keep, bias = self.tile(i0, i1, j0, j1, s.device)
        if bias is not None:
            s = s + bias.to(s.dtype)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return s


def make_mask_spec(
    b: int,
    hq: int,
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    block_mask: Tensor | None = None,
    block_size: int | None = None,
) -> MaskSpec:
    """Validate and normalise user masks.

    Args:
        b: batch size B.
        hq: query heads Hq.
        nq: query length Nq.
        nk: key length Nk.
        causal: bottom-right aligned causal mask.
        attn_mask: bool (True = attend) or additive float; (B, Nk) key padding or 4-D
            (B|1, 1|Hq, Nq|1, Nk).
        block_mask: bool (B|1, Hq|1, ceil(Nq/b), ceil(Nk/b)).
        block_size: b; when None with a block mask it is inferred as ceil(Nq / n_blocks_q).

    Returns:
        A MaskSpec with 4-D masks.
    """
    keep = bias = None
    if attn_mask is not None:
        m = attn_mask
        if m.dim() == 2:
            if tuple(m.shape) != (b, nk):
                raise ValueError(f"2-D attn_mask must be key padding (B, Nk)=({b}, {nk}), got {tuple(m.shape)}")
            m = m[:, None, None, :]  # (B, Nk) -> (B, 1, 1, Nk)
        if m.dim() != 4:
            raise ValueError(f"attn_mask must be 2-D (B, Nk) or 4-D (B, H, Nq, Nk), got shape {tuple(m.shape)}")
        for got, full, name in zip(m.shape, (b, hq, nq, nk), ("B", "H", "Nq", "Nk")):
            if got not in (1, full) or (name == "Nk" and got != full):
                raise ValueError(
                    f"attn_mask shape {tuple(m.shape)} does not broadcast to (B, H, Nq, Nk)=({b}, {hq}, {nq}, {nk})"
                )
        if m.dtype == torch.bool:
            keep = m
        elif m.is_floating_point():
            bias = m
        else:
            raise ValueError(f"attn_mask must be bool or floating point, got {m.dtype}")
    if block_mask is not None:
        if block_mask.dtype != torch.bool or block_mask.dim() != 4:
            raise ValueError(f"block_mask must be a 4-D bool tensor, got {block_mask.dtype} {tuple(block_mask.shape)}")
        nbq, nbk = block_mask.shape[-2:]
        if block_size is None:
            block_size = math.ceil(nq / nbq)
        if math.ceil(nq / block_size) != nbq or math.ceil(nk / block_size) != nbk:
            raise ValueError(
                f"block_mask blocks ({nbq}, {nbk}) do not match ceil(Nq/b), ceil(Nk/b) for "
                f"Nq={nq}, Nk={nk}, block_size={block_size}"
            )
        if block_mask.shape[0] not in (1, b) or block_mask.shape[1] not in (1, hq):
            raise ValueError(f"block_mask shape {tuple(block_mask.shape)} does not broadcast to B={b}, H={hq}")
    return MaskSpec(nq, nk, causal, keep, bias, block_mask, block_size)


def tiled_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    attn_mask: Tensor | None,
    block_mask: Tensor | None,
    block_size: int | None,
) -> tuple[Tensor, Tensor, MaskSpec]:
    """(k, v, spec) for the tiled kernels: k, v expanded to q's heads (B, Hq, Nk, D) and the normalised masks.

    Autograd sums dk, dv over each grouped-query head group through the expansion.
    """
    bsz, hq, nq, _ = q.shape
    spec = make_mask_spec(
        bsz, hq, nq, k.shape[2], causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size
    )
    return expand_kv(k, hq), expand_kv(v, hq), spec


def masked_softmax(s: Tensor) -> Tensor:
    """Row softmax over the last axis where rows that are entirely -inf give 0 (not NaN).

    Args:
        s: (..., Nk) scores, -inf where masked.
    """
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # empty rows: exp(-inf - 0) = 0, no NaN
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attn_mask: Tensor | None = None,
    block_mask: Tensor | None = None,
    block_size: int | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> Tensor:
    """Dense attention oracle: einsum + masked softmax, materialising the full score matrix.

    Args:
        q: (B, Hq, Nq, D) queries.
        k: (B, Hkv, Nk, D) keys; Hq % Hkv == 0.
        v: (B, Hkv, Nk, D) values.
        causal: bottom-right aligned causal mask (``j <= i + Nk - Nq``).
        attn_mask: bool (True = attend) or additive float, (B, Nk) or (B|1, 1|Hq, Nq|1, Nk).
        block_mask: bool (B|1, Hq|1, ceil(Nq/b), ceil(Nk/b)), True = block kept.
        block_size: b of ``block_mask`` (inferred from Nq when None).
        scale: score scale, default 1/sqrt(D).
        upcast: compute in float64 (the oracle); False computes in the input dtype (the
            "naive" baseline whose error sets the test tolerance).

    Returns:
        (B, Hq, Nq, D) in the input dtype when ``upcast`` is False, float64 otherwise.
        Fully masked rows are 0.
    """
    bsz, hq, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    k = expand_kv(k, hq)  # (B, Hq, Nk, D)
    v = expand_kv(v, hq)
    spec = make_mask_spec(
        bsz, hq, nq, nk, causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size
    )
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # (B, Hq, Nq, Nk)
    s = spec.apply(s, 0, nq, 0, nk)
    p = masked_softmax(s)  # (B, Hq, Nq, Nk)
    return torch.einsum("bhij,bhjd->bhid", p, v)  # (B, Hq, Nq, D)


@register_kernel("naive", description="dense einsum + masked softmax in the input dtype (the reference)", oracle=True)
def _naive_kernel(q, k, v, *, causal, attn_mask, block_mask, scale, cache_words, block_size) -> Tensor:
    return attention_ref(
        q,
        k,
        v,
        causal=causal,
        attn_mask=attn_mask,
        block_mask=block_mask,
        block_size=block_size,
        scale=scale,
        upcast=False,
    )
