"""Masked low-rank products (M o A B^T) C and their transposes, by chunked prefix / suffix sums.

Source: notes §0 T3 (row-wise Kronecker product: (U1 U2^T) o (G V^T) = (U1 (.) G)(U2 (.) V)^T) and T4 (causal
low-rank product by cumulative sums). An n x n matrix is never formed: rows are processed in chunks of ``chunk``
tokens; across chunks only a (k x m) running state is kept, inside a chunk a (chunk x chunk) block is used.

A factor is either a tensor (..., n, k) or a pair (X (..., n, a), Y (..., n, b)) standing for the row-wise
Kronecker product X (.) Y of shape (..., n, a b); pairs are expanded one chunk at a time, so the n x a b
matrix is never held either.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

__all__ = ["Factor", "rowwise_kron", "lowrank_matmul", "lowrank_matmul_t", "DEFAULT_CHUNK"]

Factor = Union[Tensor, tuple[Tensor, Tensor]]
DEFAULT_CHUNK = 128


def rowwise_kron(x: Tensor, y: Tensor) -> Tensor:
    """(X (.) Y)_i = X_i (x) Y_i: (..., n, a), (..., n, b) -> (..., n, a b) (notes §0 T3)."""
    return (x.unsqueeze(-1) * y.unsqueeze(-2)).flatten(-2)


def _rows(f: Factor, s: int, e: int) -> Tensor:
    if isinstance(f, tuple):
        return rowwise_kron(f[0][..., s:e, :], f[1][..., s:e, :])
    return f[..., s:e, :]


def _n(f: Factor) -> int:
    return (f[0] if isinstance(f, tuple) else f).shape[-2]


def lowrank_matmul(a: Factor, b: Factor, c: Tensor, *, causal: bool, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Y = (M o A B^T) C with M the all-ones (``causal=False``) or lower-triangular ones mask.

    Args:
        a, b: factors (..., n, k) (or Kronecker pairs, see the module doc); c: (..., n, m).
        causal: row i sums over j <= i only.
        chunk: rows per block (memory O(chunk^2 + k m) per batch element besides inputs/outputs).

    Returns:
        (..., n, m). Time O(n k m + n chunk (k + m)).
    """
    n = _n(a)
    out = torch.empty(*c.shape[:-2], n, c.shape[-1], dtype=c.dtype, device=c.device)
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if not causal:
        state = sum(_rows(b, s, e).transpose(-1, -2) @ c[..., s:e, :] for s, e in spans)  # (..., k, m)
        for s, e in spans:
            out[..., s:e, :] = _rows(a, s, e) @ state
        return out
    state = None
    for s, e in spans:
        ar, br, cr = _rows(a, s, e), _rows(b, s, e), c[..., s:e, :]
        blk = torch.tril(ar @ br.transpose(-1, -2)) @ cr  # (..., chunk, m): j <= i inside the chunk
        out[..., s:e, :] = blk if state is None else blk + ar @ state
        upd = br.transpose(-1, -2) @ cr  # (..., k, m): this chunk's keys for every later row
        state = upd if state is None else state + upd
    return out


def lowrank_matmul_t(a: Factor, b: Factor, c: Tensor, *, causal: bool, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Y = (M o A B^T)^T C: row j sums over i (>= j when causal) of (a_i . b_j) c_i, by suffix sums.

    Args / returns as :func:`lowrank_matmul` (a, b: (..., n, k); c: (..., n, m) -> (..., n, m)).
    """
    n = _n(a)
    out = torch.empty(*c.shape[:-2], n, c.shape[-1], dtype=c.dtype, device=c.device)
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if not causal:
        state = sum(_rows(a, s, e).transpose(-1, -2) @ c[..., s:e, :] for s, e in spans)
        for s, e in spans:
            out[..., s:e, :] = _rows(b, s, e) @ state
        return out
    state = None
    for s, e in reversed(spans):
        ar, br, cr = _rows(a, s, e), _rows(b, s, e), c[..., s:e, :]
        blk = torch.tril(ar @ br.transpose(-1, -2)).transpose(-1, -2) @ cr  # i >= j inside the chunk
        out[..., s:e, :] = blk if state is None else blk + br @ state
        upd = ar.transpose(-1, -2) @ cr
        state = upd if state is None else state + upd
    return out
