"""Degree-g polynomial (Taylor) features of exp(<q, k>), their error bound and the degree rule.

Source: Alman & Song 2023, arXiv 2302.13214 (Alman–Song style polynomial method, as
used by "Multi-Layer Transformers Gradient Can be Approximated in Almost Linear Time", arXiv 2408.13233).

For a multi-index alpha in N^d with |alpha| <= g, phi_alpha(x) = x^alpha / sqrt(alpha!). Then
<phi(q), phi(k)> = sum_{j <= g} <q, k>^j / j!, the degree-g Taylor polynomial T_g of exp(<q, k>). Attention's
score scale s is folded in by the callers (q -> q sqrt(s), k -> k sqrt(s)), so the features take tau = 1.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations_with_replacement

import torch
from torch import Tensor

__all__ = ["PolyFeatures", "degree_for", "degree_rule", "feature_count", "taylor_error_bound"]


def taylor_error_bound(beta: float, degree: int) -> float:
    """eps_g = e^{2 beta} beta^{g+1} / (g+1)!: bound on |T_g(x) e^{-x} - 1| for |x| <= beta (Alman & Song 2023, arXiv 2302.13214).

    Args:
        beta: bound on |logit| (>= 0).
        degree: Taylor degree g (>= 0).

    Returns:
        The bound (a float; ``inf`` on overflow).
    """
    if beta < 0 or degree < 0:
        raise ValueError(f"beta and degree must be >= 0, got {beta}, {degree}")
    if beta == 0:
        return 0.0
    try:
        return math.exp(2 * beta + (degree + 1) * math.log(beta) - math.lgamma(degree + 2))
    except OverflowError:
        return math.inf


def degree_rule(beta: float, eps: float) -> int:
    """The closed-form sufficient degree: g + 1 >= max(2 e^2 beta, 2 beta / ln 2 + log2(1/eps)) gives eps_g <= eps.

    Raises:
        ValueError: eps not in (0, 1) or beta < 0.
    """
    if not 0 < eps < 1 or beta < 0:
        raise ValueError(f"need 0 < eps < 1 and beta >= 0, got eps={eps}, beta={beta}")
    return max(0, math.ceil(max(2 * math.e**2 * beta, 2 * beta / math.log(2) + math.log2(1 / eps))) - 1)


def degree_for(beta: float, eps: float) -> int:
    """The smallest degree g with eps_g(beta) <= eps, searched up to :func:`degree_rule` (which always suffices).

    The rule alone over-estimates (beta = 0.5, eps = 1e-4: rule 14, search 5); the search is what edgepipe uses.
    """
    top = degree_rule(beta, eps)
    for g in range(top + 1):
        if taylor_error_bound(beta, g) <= eps:
            return g
    return top


def feature_count(d: int, degree: int) -> int:
    """k = C(d + g, g): the number of multi-indices alpha in N^d with |alpha| <= g."""
    return math.comb(d + degree, degree)


@lru_cache(maxsize=64)
def _plan(d: int, degree: int) -> tuple[list[tuple[int, int]], list[int], list[int], list[float]]:
    """Per degree j: the feature slice [start, stop); for every feature its parent (degree j-1) and last index,
    and its coefficient log(1/alpha!) (features are ordered by degree, multi-indices as sorted index tuples)."""
    slices, parent, last, log_coef = [(0, 1)], [0], [0], [0.0]
    prev: dict[tuple[int, ...], int] = {(): 0}
    for j in range(1, degree + 1):
        start = len(parent)
        cur: dict[tuple[int, ...], int] = {}
        for combo in combinations_with_replacement(range(d), j):
            cur[combo] = len(parent)
            parent.append(prev[combo[:-1]])
            last.append(combo[-1])
            counts = [combo.count(i) for i in set(combo)]
            log_coef.append(-sum(math.lgamma(c + 1) for c in counts))
        slices.append((start, len(parent)))
        prev = cur
    return slices, parent, last, log_coef


class PolyFeatures:
    """phi(x) = [x^alpha * w_alpha]_{|alpha| <= g} for x of shape (..., d), ordered by degree.

    ``power`` sets w_alpha = (1/alpha!)^power: 1/2 gives <phi(q), phi(k)> = T_g(<q, k>) (matrix attention);
    1/3 gives sum_alpha phi(q) phi(a) phi(b) = T_g(sum_t q_t a_t b_t) (tensor attention, arXiv 2405.16411).

    Cost O(n k) multiplies: each degree-j feature is its parent's value times one coordinate.
    """

    def __init__(self, d: int, degree: int, *, power: float = 0.5) -> None:
        if d < 1 or degree < 0:
            raise ValueError(f"need d >= 1 and degree >= 0, got d={d}, degree={degree}")
        self.d, self.degree, self.power = d, degree, power
        slices, parent, last, log_coef = _plan(d, degree)
        self.slices = slices
        self._parent = torch.tensor(parent, dtype=torch.long)
        self._last = torch.tensor(last, dtype=torch.long)
        self._log_coef = torch.tensor(log_coef, dtype=torch.float64)
        self.k = len(parent)

    def __call__(self, x: Tensor) -> Tensor:
        """(..., d) -> (..., k) in x's dtype; differentiable (products of x's coordinates)."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected last dimension {self.d}, got {tuple(x.shape)}")
        dev = x.device
        nd = x.dim()
        xt = x.permute(nd - 1, *range(nd - 1))  # (d, ...): gathers along the leading dim copy whole rows
        parts = [torch.ones(1, *x.shape[:-1], dtype=x.dtype, device=dev)]
        prev = parts[0]
        for j in range(1, self.degree + 1):
            s0, s1 = self.slices[j]
            p0 = self.slices[j - 1][0]
            par = (self._parent[s0:s1] - p0).to(dev)
            cur = prev.index_select(0, par) * xt.index_select(0, self._last[s0:s1].to(dev))  # (k_j, ...)
            parts.append(cur)
            prev = cur
        coef = torch.exp(self.power * self._log_coef).to(dtype=x.dtype, device=dev)
        return torch.cat(parts, dim=0).permute(*range(1, nd), 0) * coef  # (..., k); non-negative perm for ONNX
