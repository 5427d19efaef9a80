"""Softmax attention by polynomial features: forward and factorized backward in O(n k d^2), never n x n.

Source: "Multi-Layer Transformers Gradient Can be Approximated in Almost Linear Time" (arXiv 2408.13233), as
reconstructed from arXiv 2408.13233; the causal mask by prefix / suffix sums (arXiv 2408.13233).

Shapes (one legend for the module): B batch, H heads, N tokens, D head dim, k = C(D + g, g) features.
With s the score scale, S = s Q K^T, f = softmax(S) (row-wise, under the mask), Y = f V and G = dL/dY:

* U1 = phi(sqrt(s) Q), U2 = phi(sqrt(s) K): U1 U2^T = T_g(S) elementwise (``features.PolyFeatures``);
* Dt = (M o U1 U2^T) 1, Y ~ Dt^-1 (M o U1 U2^T) V;
* r = rowsum(G o Y); P = dL/dS = f o (G V^T) - diag(r) f = Dt^-1 [(U1 (.) G)(U2 (.) V)^T - diag(r) U1 U2^T];
* dQ = s P K, dK = s P^T Q, dV = f^T G, all through ``ops.lowrank_matmul`` / ``lowrank_matmul_t``.

Error (Alman & Song 2023, arXiv 2302.13214): with beta >= max |S|, every kernel entry has relative error <= eps_g =
e^{2 beta} beta^{g+1} / (g+1)!, so each attention weight has relative error <= 2 eps_g / (1 - eps_g) and
|Y~ - Y|_max <= 2 eps_g / (1 - eps_g) |V|_max.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dense import masked_softmax, softmax_logit_grad
from .features import PolyFeatures
from .ops import DEFAULT_CHUNK, lowrank_matmul, lowrank_matmul_t

__all__ = [
    "lowrank_attention",
    "lowrank_attention_backward",
    "lowrank_attention_forward",
    "poly_attention_ref",
    "softmax_attention_grads_ref",
    "softmax_attention_ref",
]


def _mask_dense(n_q: int, n_k: int, causal: bool, key_mask: Tensor | None, device) -> Tensor | None:
    """bool (B|1, 1, Nq, Nk) True = attend, or None."""
    m = None
    if causal:
        m = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()[None, None]
    if key_mask is not None:
        km = key_mask.bool()[:, None, None, :]
        m = km if m is None else (m & km)
    return m


def _scale(d: int, scale: float | None) -> float:
    """The score scale s: 1/sqrt(D) by default."""
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _dense_weights(q: Tensor, k: Tensor, s: float, causal: bool, key_mask: Tensor | None) -> Tensor:
    """(B, H, Nq, Nk) attention weights softmax(s Q K^T) under the mask (float64 in, float64 out)."""
    m = _mask_dense(q.shape[-2], k.shape[-2], causal, key_mask, q.device)
    return masked_softmax(s * q @ k.transpose(-1, -2), m)


def softmax_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False, key_mask: Tensor | None = None
) -> Tensor:
    """Dense float64 oracle: softmax(s Q K^T) V under the mask. q, k, v (B, H, N, D) -> (B, H, N, D) float64."""
    q, k, v = q.double(), k.double(), v.double()
    return _dense_weights(q, k, _scale(q.shape[-1], scale), causal, key_mask) @ v


def softmax_attention_grads_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form dense gradients (arXiv 2408.13233) of <G, softmax(s Q K^T) V>: (dQ, dK, dV), float64, O(N^2)."""
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    s = _scale(q.shape[-1], scale)
    f = _dense_weights(q, k, s, causal, key_mask)  # (B, H, N, N)
    p = softmax_logit_grad(f, g @ v.transpose(-1, -2), g, f @ v)  # dL/dS, dL/df = G V^T
    return s * p @ k, s * p.transpose(-1, -2) @ q, f.transpose(-1, -2) @ g


def poly_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    degree: int,
    scale: float | None = None,
    causal: bool = False,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Dense float64 oracle of the *approximate* attention: T_g(s Q K^T) normalized, O(N^2) (checks factorization)."""
    q, k, v = q.double(), k.double(), v.double()
    x = _scale(q.shape[-1], scale) * q @ k.transpose(-1, -2)
    a = x**0  # (..., N, M) ones: the j = 0 term of the Taylor sum
    for j in range(1, degree + 1):
        a = a + x**j / math.factorial(j)
    m = _mask_dense(q.shape[-2], k.shape[-2], causal, key_mask, q.device)
    if m is not None:
        a = a * m
    return (a @ v) / a.sum(-1, keepdim=True)


def _features(q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float, degree: int) -> tuple[Tensor, Tensor]:
    feats = PolyFeatures(q.shape[-1], degree)
    root = math.sqrt(scale)
    u1 = feats(q * root)  # (B, H, N, k)
    u2 = feats(k * root)
    if key_mask is not None:
        u2 = u2 * key_mask[:, None, :, None].to(u2.dtype)  # padded keys get zero weight
    return u1, u2


def lowrank_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    degree: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Factorized forward on equal head counts: q, k, v (B, H, N, D) -> (Y (B, H, N, D), Dt (B, H, N, 1))."""
    u1, u2 = _features(q, k, key_mask, scale, degree)
    return _forward(u1, u2, v, causal, chunk)


def _forward(u1: Tensor, u2: Tensor, v: Tensor, causal: bool, chunk: int) -> tuple[Tensor, Tensor]:
    # one pass for numerator and denominator: C = [V, 1] (B, H, N, D + 1)
    c = torch.cat([v, torch.ones(*v.shape[:-1], 1, dtype=v.dtype, device=v.device)], dim=-1)
    nd = lowrank_matmul(u1, u2, c, causal=causal, chunk=chunk)
    den = nd[..., -1:]  # (B, H, N, 1) = Dt
    # a query that sees no real key (left padding under a causal mask) has Dt = 0 and numerator 0: output 0
    den = torch.where(den == 0, torch.ones_like(den), den)
    return nd[..., :-1] / den, den


def lowrank_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    den: Tensor,
    g: Tensor,
    *,
    degree: int,
    scale: float,
    causal: bool,
    key_mask: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """Factorized backward (arXiv 2408.13233): (dQ, dK, dV), each (B, H, N, D), in O(N k D^2).

    ``y`` and ``den`` are :func:`lowrank_attention_forward`'s outputs, ``g`` = dL/dY.
    """
    u1, u2 = _features(q, k, key_mask, scale, degree)
    return _backward(q, k, v, y, den, g, u1, u2, scale=scale, causal=causal, chunk=chunk)


def _backward(q, k, v, y, den, g, u1, u2, *, scale: float, causal: bool, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    g = g.contiguous()
    r = (g * y).sum(-1, keepdim=True)  # (B, H, N, 1) = rowsum(f o G V^T)
    dv = lowrank_matmul_t(u1, u2, g / den, causal=causal, chunk=chunk)  # f^T G
    # P K = Dt^-1 [(U1 (.) G)(U2 (.) V)^T K - r (U1 U2^T) K]
    pk = (
        lowrank_matmul((u1, g), (u2, v), k, causal=causal, chunk=chunk)
        - r * lowrank_matmul(u1, u2, k, causal=causal, chunk=chunk)
    ) / den
    # P^T Q = (U2 (.) V)(U1 (.) G)^T (Q / Dt) - U2 U1^T (r Q / Dt)
    qd = q / den
    ptq = lowrank_matmul_t((u1, g), (u2, v), qd, causal=causal, chunk=chunk) - lowrank_matmul_t(
        u1, u2, r * qd, causal=causal, chunk=chunk
    )
    return scale * pk, scale * ptq, dv


class _LowRankAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, causal, degree, chunk):
        u1, u2 = _features(q, k, key_mask, scale, degree)
        y, den = _forward(u1, u2, v, causal, chunk)
        ctx.save_for_backward(q, k, v, y, den, u1, u2)  # features kept: O(N k) memory, saves their recompute
        ctx.cfg = (scale, causal, chunk)
        return y

    @staticmethod
    def backward(ctx, g):
        q, k, v, y, den, u1, u2 = ctx.saved_tensors
        scale, causal, chunk = ctx.cfg
        dq, dk, dv = _backward(q, k, v, y, den, g, u1, u2, scale=scale, causal=causal, chunk=chunk)
        return dq, dk, dv, None, None, None, None, None


def lowrank_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    degree: int,
    scale: float | None = None,
    causal: bool = False,
    key_mask: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """Softmax attention approximated by degree-``degree`` polynomial features, with the factorized backward.

    Args:
        q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq % Hkv == 0 (grouped-query heads share K/V).
        degree: Taylor degree g (k = C(D + g, g) features per head).
        scale: score scale s, default 1/sqrt(D).
        causal: query i sees keys j <= i (prefix sums).
        key_mask: optional bool (B, N), True = a real token (padding keys are ignored).
        chunk: tokens per block of the prefix sums (the largest square formed is chunk x chunk).

    Returns:
        (B, Hq, N, D) in q's dtype. Differentiable in q, k, v; the backward costs O(N k D^2), like the forward.

    Raises:
        ValueError: bad shapes / dtypes, degree < 0.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q (B, Hq, N, D), k and v (B, Hkv, N, D) expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"self-attention only (Nq == Nk), got {q.shape[-2]} and {k.shape[-2]}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # autograd sums each group
    s = _scale(q.shape[-1], scale)
    if key_mask is not None:
        key_mask = key_mask.to(dtype=torch.bool, device=q.device)
    return _LowRankAttnFn.apply(q, k, v, key_mask, s, bool(causal), int(degree), int(chunk))
