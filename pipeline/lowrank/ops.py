"""Masked low-rank products (M o A B^T) C and their transposes, by chunked prefix / suffix sums.

Source: arXiv 2408.13233 (row-wise Kronecker product: (U1 U2^T) o (G V^T) = (U1 (.) G)(U2 (.) V)^T) and the causal
low-rank product by cumulative sums). An n x n matrix is never formed: rows are processed in chunks of ``chunk``
tokens; each chunk contributes a (k x m) state, prefix (suffix) sums over chunks carry them forward (backward),
inside a chunk a (chunk x chunk) masked block is used. All chunks are processed at once (no Python loop).

A factor is either a tensor (..., n, k) or a pair (X (..., n, a), Y (..., n, b)) standing for the row-wise
Kronecker product X (.) Y of shape (..., n, a b); pairs are never expanded over all n rows (only n x b m
matrices are formed), so the n x a b matrix is never held either.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK", "Factor", "lowrank_matmul", "lowrank_matmul_t", "rowwise_kron"]

Factor = Tensor | tuple[Tensor, Tensor]
DEFAULT_CHUNK = 32


def rowwise_kron(x: Tensor, y: Tensor) -> Tensor:
    """(X (.) Y)_i = X_i (x) Y_i: (..., n, a), (..., n, b) -> (..., n, a b) (arXiv 2408.13233)."""
    return (x.unsqueeze(-1) * y.unsqueeze(-2)).flatten(-2)


def _pad_chunks(t: Tensor, chunk: int) -> Tensor:
    """(..., n, w) -> (..., n_chunks, chunk, w), zero rows appended (they contribute nothing to any sum)."""
    n = t.shape[-2]
    pad = -n % chunk
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad))
    return t.unflatten(-2, (t.shape[-2] // chunk, chunk))


def _map(f: Factor, fn) -> Factor:
    return (fn(f[0]), fn(f[1])) if isinstance(f, tuple) else fn(f)


def _width(f: Factor) -> int:
    return f[0].shape[-1] * f[1].shape[-1] if isinstance(f, tuple) else f.shape[-1]


def _t_matmul(f: Factor, c: Tensor) -> Tensor:
    """F^T C summed over the row axis (-2): (..., r, k), (..., r, m) -> (..., k, m); a pair (X, Y) as
    X^T (Y (.) C) reshaped, so only an r x kb m matrix is formed, never r x ka kb."""
    if not isinstance(f, tuple):
        return f.transpose(-1, -2) @ c
    x, y = f
    return (x.transpose(-1, -2) @ rowwise_kron(y, c)).reshape(*x.shape[:-2], x.shape[-1] * y.shape[-1], c.shape[-1])


def _apply(f: Factor, state: Tensor) -> Tensor:
    """F @ state, state (..., k, m); for a pair (X, Y) without forming X (.) Y:
    sum_{a, b} X_ia Y_ib state[(a, b)] = sum_b Y_ib (X_i @ state.view(ka, kb m))[b]."""
    if not isinstance(f, tuple):
        return f @ state
    x, y = f
    ka, kb, m = x.shape[-1], y.shape[-1], state.shape[-1]
    xs = (x @ state.reshape(*state.shape[:-2], ka, kb * m)).unflatten(-1, (kb, m))  # (..., r, kb, m)
    return (xs * y.unsqueeze(-1)).sum(-2)


def _gram(a: Factor, b: Factor) -> Tensor:
    """A B^T over the last two axes, (..., r, r); pairs by (X1 X2^T) o (Y1 Y2^T) (arXiv 2408.13233)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return (a[0] @ b[0].transpose(-1, -2)) * (a[1] @ b[1].transpose(-1, -2))
    a = rowwise_kron(*a) if isinstance(a, tuple) else a
    b = rowwise_kron(*b) if isinstance(b, tuple) else b
    return a @ b.transpose(-1, -2)


def _n(f: Factor) -> int:
    return (f[0] if isinstance(f, tuple) else f).shape[-2]


def _causal(a: Factor, b: Factor, c: Tensor, chunk: int, transpose: bool) -> Tensor:
    n = _n(a)
    ac, bc, cc = (
        _map(a, lambda t: _pad_chunks(t, chunk)),
        _map(b, lambda t: _pad_chunks(t, chunk)),
        _pad_chunks(c, chunk),
    )
    tri = _gram(ac, bc).tril()  # (..., nc, chunk, chunk): i >= j inside each chunk
    if not transpose:
        states = _t_matmul(bc, cc)  # (..., nc, k, m): each chunk's keys
        prefix = torch.cat(
            [torch.zeros_like(states[..., :1, :, :]), states[..., :-1, :, :].cumsum(-3)], dim=-3
        )  # chunks before
        out = tri @ cc + _apply(ac, prefix)
    else:
        states = _t_matmul(ac, cc)
        rev = states.flip(-3)
        suffix = torch.cat([torch.zeros_like(rev[..., :1, :, :]), rev[..., :-1, :, :].cumsum(-3)], dim=-3).flip(
            -3
        )  # chunks after
        out = tri.transpose(-1, -2) @ cc + _apply(bc, suffix)
    return out.flatten(-3, -2)[..., :n, :]


def lowrank_matmul(a: Factor, b: Factor, c: Tensor, *, causal: bool, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Y = (M o A B^T) C with M the all-ones (``causal=False``) or lower-triangular ones mask.

    Args:
        a, b: factors (..., n, k) (or Kronecker pairs, see the module doc); c: (..., n, m).
        causal: row i sums over j <= i only: per-chunk states (k x m), an exclusive prefix sum over chunks,
            and the masked (chunk x chunk) block inside each chunk, all chunks at once.
        chunk: rows per block.

    Returns:
        (..., n, m). Time O(n k m + n chunk (k + m)); memory O(n chunk + (n / chunk) k m) besides inputs.
    """
    if not causal:
        return _apply(a, _t_matmul(b, c))
    return _causal(a, b, c, chunk, transpose=False)


def lowrank_matmul_t(a: Factor, b: Factor, c: Tensor, *, causal: bool, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Y = (M o A B^T)^T C: row j sums over i (>= j when causal) of (a_i . b_j) c_i, by suffix sums.

    Args / returns as :func:`lowrank_matmul` (a, b: (..., n, k); c: (..., n, m) -> (..., n, m)).
    """
    if not causal:
        return _apply(b, _t_matmul(a, c))
    return _causal(a, b, c, chunk, transpose=True)
