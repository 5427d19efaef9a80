"""Kernel grid vs the float64 oracle, FlashAttention-project style.

Tolerance is relative to the error of a naive computation in the same dtype:
``max|out - ref64| <= 2 * max|naive - ref64| + eps`` for the output and for dq, dk, dv (the
reference gradients come from autograd through the float64 oracle on float64 copies).
eps = 16 * finfo(dtype).eps * max(1, max|ref|) only guards against a naive error of exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.kernels import attention, attention_ref
from pipeline.kernels import block_masks as bm
from pipeline.kernels.block_sparse import _kept_blocks
from pipeline.kernels.reference import make_mask_spec


def _inputs(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


def _pad_mask(b, nk):
    m = torch.ones(b, nk, dtype=torch.bool)
    m[-1, nk - nk // 3 :] = False  # last sequence is right-padded by a third
    return m


def _run(q, k, v, do, **kw):
    """(out, dq, dk, dv) of attention(**kw) on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    return (out.detach(), *grads)


def _ref(q, k, v, do, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = attention_ref(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do.double())
    return (out.detach(), *grads)


def assert_matches_oracle(
    q, k, v, do, *, kernel, causal=False, attn_mask=None, block_mask=None, block_size=None, cache_words=None
):
    got = _run(
        q,
        k,
        v,
        do,
        kernel=kernel,
        causal=causal,
        attn_mask=attn_mask,
        block_mask=block_mask,
        block_size=block_size,
        cache_words=cache_words,
    )
    naive = _run(
        q, k, v, do, kernel="naive", causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size
    )
    ref = _ref(q, k, v, do, causal=causal, attn_mask=attn_mask, block_mask=block_mask, block_size=block_size)
    for name, g, n, r in zip(("out", "dq", "dk", "dv"), got, naive, ref):
        assert g.dtype == q.dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        base = (n.double() - r).abs().max().item()
        eps = 16 * torch.finfo(q.dtype).eps * max(1.0, r.abs().max().item())
        assert err <= 2 * base + eps, f"{kernel} {name}: err {err:.3e} > 2 * naive {base:.3e} + {eps:.1e}"


# (b, hq, hkv, nq, nk, d, dtype, causal, mask, cache_words)
FLASH_CASES = [
    (2, 4, 2, 113, 113, 32, torch.float32, False, "pad", 3000),
    (2, 4, 2, 113, 113, 32, torch.float32, True, "pad", 3000),
    (1, 2, 1, 203, 113, 64, torch.float64, True, None, 20000),  # Nq > Nk: first 90 rows see nothing
    (1, 2, 2, 113, 203, 128, torch.float32, False, "bool4d", None),
    (2, 2, 1, 203, 203, 64, torch.float32, True, "additive", 9000),
    (1, 2, 2, 1023, 1023, 64, torch.float32, True, None, None),
]


def _mask(kind, b, hq, nq, nk, dtype):
    if kind is None:
        return None
    if kind == "pad":
        return _pad_mask(b, nk)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(b, 1, nq, nk, generator=g) > 0.3
    keep[:, :, 3] = False  # one fully masked row
    if kind == "bool4d":
        return keep
    bias = torch.randn(b, hq, nq, nk, generator=g, dtype=torch.float64).to(dtype)
    return bias.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,causal,mask,cache_words", FLASH_CASES)
def test_flash_matches_oracle(b, hq, hkv, nq, nk, d, dtype, causal, mask, cache_words):
    q, k, v, do = _inputs(b, hq, hkv, nq, nk, d, dtype)
    assert_matches_oracle(
        q, k, v, do, kernel="flash", causal=causal, attn_mask=_mask(mask, b, hq, nq, nk, dtype), cache_words=cache_words
    )


SMALL_CACHE_CASES = [
    (2, 4, 2, 113, 113, 32, torch.float32, True, "pad", 768),  # M = 0.75 d^2: the small-cache regime, b = 16
    (1, 2, 1, 203, 113, 64, torch.float64, True, None, 1200),
    (1, 2, 2, 113, 203, 64, torch.float32, False, "bool4d", 2000),
    (1, 2, 2, 1023, 1023, 32, torch.float32, False, None, None),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,causal,mask,cache_words", SMALL_CACHE_CASES)
def test_small_cache_matches_oracle(b, hq, hkv, nq, nk, d, dtype, causal, mask, cache_words):
    q, k, v, do = _inputs(b, hq, hkv, nq, nk, d, dtype)
    assert_matches_oracle(
        q,
        k,
        v,
        do,
        kernel="small_cache",
        causal=causal,
        attn_mask=_mask(mask, b, hq, nq, nk, dtype),
        cache_words=cache_words,
    )


def _block_mask(kind, hq, nbq, nbk, causal):
    if kind == "window":
        return bm.sliding_window(nbq, nbk, 2, causal)
    if kind == "global":
        return bm.global_tokens(nbq, nbk, 1, causal) | bm.sliding_window(nbq, nbk, 1, causal)
    if kind == "dilated":
        return bm.dilated(nbq, nbk, 3, causal)
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, hq, nbq, nbk, generator=g) < 0.4  # a different random pattern per head


# (b, hq, hkv, nq, nk, d, dtype, causal, pad, kind, block)
BLOCK_CASES = [
    (2, 4, 2, 113, 113, 32, torch.float32, True, True, "window", 16),
    (2, 4, 4, 113, 203, 64, torch.float32, False, True, "global", 32),
    (1, 4, 2, 203, 113, 32, torch.float64, True, False, "random", 16),
    (1, 2, 1, 203, 203, 64, torch.float32, False, False, "dilated", 24),
    (1, 2, 2, 1023, 1023, 128, torch.float32, True, False, "window", 64),
]


@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,dtype,causal,pad,kind,block", BLOCK_CASES)
def test_block_sparse_matches_oracle(b, hq, hkv, nq, nk, d, dtype, causal, pad, kind, block):
    q, k, v, do = _inputs(b, hq, hkv, nq, nk, d, dtype)
    mask = _block_mask(kind, hq, math.ceil(nq / block), math.ceil(nk / block), causal)
    attn_mask = _pad_mask(b, nk) if pad else None
    assert_matches_oracle(
        q, k, v, do, kernel="block_sparse", causal=causal, attn_mask=attn_mask, block_mask=mask, block_size=block
    )


def test_flash_with_block_mask_matches_oracle():
    q, k, v, do = _inputs(1, 2, 1, 113, 150, 32, torch.float32)
    mask = _block_mask("random", 2, math.ceil(113 / 16), math.ceil(150 / 16), False)
    assert_matches_oracle(q, k, v, do, kernel="flash", block_mask=mask, block_size=16)


def test_block_sparse_visits_only_kept_blocks():
    mask = bm.sliding_window(8, 8, 1, causal=False)
    spec = make_mask_spec(1, 1, 120, 120, causal=True, block_mask=mask, block_size=16)
    kept = _kept_blocks(spec, 8, 8, 16)
    expected = (bm.sliding_window(8, 8, 1, causal=True)).sum().item()  # window & causal
    assert sum(map(sum, kept)) == expected == 15


@pytest.mark.parametrize("kernel", ["flash", "small_cache", "block_sparse", "naive"])
def test_fully_masked_rows_are_zero_with_zero_grad(kernel):
    q, k, v, do = _inputs(1, 2, 2, 40, 25, 16, torch.float64)  # causal with Nq > Nk: rows 0..14 see nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, kernel=kernel, causal=True, block_size=8)
    (dq,) = torch.autograd.grad(out, leaves[0], do)
    assert torch.isfinite(out).all()
    assert out[:, :, :15].abs().max().item() == 0.0
    assert dq[:, :, :15].abs().max().item() == 0.0
    assert out[:, :, 15:].abs().min().item() > 0.0 or out[:, :, 15:].abs().sum().item() > 0.0


def test_causal_is_bottom_right_aligned():
    q, k, v, _ = _inputs(1, 1, 1, 5, 9, 8, torch.float64)
    out = attention(q, k, v, kernel="flash", causal=True, block_size=2)
    # the last query sees all 9 keys: identical to unmasked attention for that row
    full = attention_ref(q, k, v)
    torch.testing.assert_close(out[:, :, -1], full[:, :, -1], rtol=0, atol=1e-12)
    # the first query sees keys 0..4 only
    first = attention_ref(q[:, :, :1], k[:, :, :5], v[:, :, :5])
    torch.testing.assert_close(out[:, :, :1], first, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kernel,kw",
    [
        ("flash", dict(block_size=3)),
        ("small_cache", dict(block_size=2)),
        (
            "block_sparse",
            dict(
                block_size=2,
                block_mask=torch.tensor(
                    [[True, False, True], [True, True, False], [False, True, True], [True, True, True]]
                )[None, None],
            ),
        ),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(kernel, kw, causal):
    q, k, v, _ = _inputs(1, 2, 1, 7, 6, 4, torch.float64)
    pad = torch.tensor([[True] * 5 + [False]])
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, kernel=kernel, causal=causal, attn_mask=pad, scale=0.7, **kw), leaves
    )


def test_bad_arguments_raise():
    q, k, v, _ = _inputs(1, 3, 2, 5, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v, _ = _inputs(1, 2, 2, 5, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="'bogus'"):
        attention(q, k, v, kernel="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key padding"):
        attention(q, k, v, attn_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask blocks"):
        attention(q, k, v, kernel="block_sparse", block_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=4)
    with pytest.raises(ValueError, match="cache_words"):
        attention(q, k, v, kernel="flash", cache_words=5)
