"""Polynomial (Taylor) kernel features: ⟨φ(x), φ(y)⟩ = Σ_{j≤s} (scale·⟨x,y⟩)^j / j!  (Alman & Song 2023, arXiv 2302.13214).

A feature is a monomial x^α with |α| ≤ s, weighted by sqrt(scale^|α| / α!). The multinomial theorem gives
(scale·⟨x,y⟩)^j / j! = Σ_{|α|=j} scale^j x^α y^α / α!, so the inner product of two feature vectors is the
degree-s Taylor polynomial T_s of exp(scale·⟨x,y⟩). The feature count is r = C(d+s, s).

Monomials are stored as index rows into the extended vector [x, 1] (length s each, index d = the constant 1),
so φ(x) = coef · Π_t [x,1][idx[:, t]]: a Gather and a product, which exports to ONNX as such.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations_with_replacement

import numpy as np

__all__ = ["feature_count", "feature_norm_bound", "kernel_error_bound", "monomials", "poly_features", "taylor_exp"]


def feature_count(d: int, degree: int) -> int:
    """r = C(d+s, s): the number of monomials of degree ≤ s in d variables."""
    return math.comb(d + degree, degree)


@lru_cache(maxsize=64)
def _monomials(d: int, degree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = list(combinations_with_replacement(range(d + 1), degree))  # sorted tuples; index d = constant 1
    idx = np.asarray(rows, dtype=np.int64).reshape(len(rows), degree)
    order = np.zeros(len(rows), dtype=np.int64)
    log_fact = np.zeros(len(rows), dtype=np.float64)
    for i, row in enumerate(rows):
        counts = np.bincount(np.asarray(row, dtype=np.int64), minlength=d + 1)[:d]
        order[i] = int(counts.sum())
        log_fact[i] = float(sum(math.lgamma(c + 1) for c in counts))
    return idx, order, log_fact


def monomials(d: int, degree: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(idx (r, s) int64 into [x, 1], coef (r,) float64 = sqrt(scale^|α| / α!)) for d variables, degree s.

    Raises:
        ValueError: d < 1, degree < 1 or scale ≤ 0.
    """
    if d < 1 or degree < 1:
        raise ValueError(f"need d >= 1 and degree >= 1, got d={d}, degree={degree}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    idx, order, log_fact = _monomials(int(d), int(degree))
    coef = np.exp(0.5 * (order * math.log(scale) - log_fact))
    return idx.copy(), coef


def poly_features(x: np.ndarray, degree: int, scale: float) -> np.ndarray:
    """φ(x): (..., d) -> (..., r), float64."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    idx, coef = monomials(d, degree, scale)
    ext = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)  # (..., d+1)
    return np.prod(ext[..., idx], axis=-1) * coef  # (..., r, s) -> (..., r)


def taylor_exp(x: np.ndarray | float, degree: int) -> np.ndarray:
    """T_s(x) = Σ_{j≤s} x^j / j!, float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    term = np.ones_like(x)
    for j in range(degree + 1):
        out = out + term
        term = term * x / (j + 1)
    return out


def feature_norm_bound(d: int, degree: int, scale: float, bound: float) -> float:
    """sup_{‖k‖∞ ≤ R} ‖φ(k)‖₂ = sqrt(T_s(scale·d·R²)): ‖φ(k)‖² = T_s(scale‖k‖²), increasing in ‖k‖², maximal
    at a corner of the box."""
    return float(math.sqrt(taylor_exp(scale * d * bound * bound, degree)))


def kernel_error_bound(beta: float, degree: int) -> float:
    """ε_s with |T_s(x)e^{-x} − 1| ≤ ε_s for |x| ≤ β (Alman & Song 2023, arXiv 2302.13214): e^{2β} β^{s+1} / (s+1)!."""
    return float(math.exp(2 * beta + (degree + 1) * math.log(max(beta, 1e-300)) - math.lgamma(degree + 2)))
