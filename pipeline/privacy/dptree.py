"""DPTree structures (arXiv 2407.14717, our reconstruction [I] of the paper's DPTree / DPTreeDistance /
DPTreeSoftmax; the paper's exact node layout is not public).

* :class:`DPTree` — binary range-sum tree over m leaves (padded to 2^L), Laplace(b) on every node with
  b = Δ₁·(L+1)/ε (each leaf lies in L+1 nodes). A range query sums the ≤ 2L canonical nodes.
* :class:`DPTreeDistance` — 1-D weighted distance queries over points x_i ∈ [−X, X] binned into m bins with
  weights w_i ∈ [−W, W]: trees T_W (Σw), T_S (Σw·x), T_Q (Σw·x²), ε/3 each.
  ℓ2²: Σ w_i (y − x_i)² = y²·W − 2y·S + Q;  ℓ1: Σ w_i|y − x_i| = y(W≤ − W>) − (S≤ − S>) split at y's bin.
* :class:`DPTreeSoftmax` — for every feature j ≤ r and every value column l (plus the all-ones column) a
  DPTreeDistance over x_i = φ_j(k_i) with weights v_il; Σ_i w_i φ_j(q) φ_j(k_i) = ½[φ_j(q)²·W + Q − ℓ2²(φ_j(q))],
  then num / den as in the feature-sum release. The k = r·(d_v+1)·(releases) pure-ε' structures compose by
  advanced composition to (ε, δ). The full-range ℓ2² identity makes the answer φ(q)ᵀ·(T_S roots), so the
  structure's post-processed state is an r×(d_v+1) matrix like the feature-sum release (this is what the
  exported graph carries), with Laplace noise of scale 3·Δ₁·(L+1)/ε' per entry.

All structures are vectorised over leading axes (one tree per leading index) and draw all noise in __init__.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.privacy.accounting import advanced_composition_epsilon
from pipeline.privacy.calibration import laplace_scale
from pipeline.privacy.release import KernelSpec, PublicBounds, answer_from_sums, clip_rows, guard_floor
from pipeline.privacy.sampler import NoiseSampler, SecureSampler

__all__ = ["DPTree", "DPTreeDistance", "DPTreeSoftmax"]


class DPTree:
    """Noisy binary range-sum trees over ``leaves`` (..., m): one tree per leading index.

    Args:
        leaves: (..., m) exact leaf sums.
        epsilon: per-tree budget (pure ε-DP).
        l1_sensitivity: Δ₁, the most the leaf vector (one tree) changes in L1 between neighbours.
        sampler: noise source (drawn here, once).
    """

    def __init__(
        self, leaves: np.ndarray, epsilon: float, l1_sensitivity: float, sampler: NoiseSampler | None = None
    ) -> None:
        sampler = sampler or SecureSampler()
        leaves = np.asarray(leaves, dtype=np.float64)
        m = leaves.shape[-1]
        self.L = max(1, math.ceil(math.log2(max(m, 2))))
        self.m = m
        self.scale = laplace_scale(epsilon, l1_sensitivity * (self.L + 1))  # b per node: a leaf lies in L+1 nodes
        pad = np.zeros(leaves.shape[:-1] + (2**self.L - m,))
        level = np.concatenate([leaves, pad], axis=-1)
        self.levels: list[np.ndarray] = []  # levels[0] = leaves (2^L), levels[L] = root (1)
        for lvl in range(self.L + 1):
            self.levels.append(level + sampler.laplace(level.shape, self.scale))
            if lvl < self.L:
                level = level.reshape(level.shape[:-1] + (-1, 2)).sum(-1)  # (..., 2^(L-lvl-1), 2) -> parents

    def canonical_nodes(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(level, index) of the canonical nodes covering leaves [lo, hi] inclusive (empty if lo > hi)."""
        out: list[tuple[int, int]] = []
        lvl = 0
        lo, hi = max(lo, 0), min(hi, 2**self.L - 1)
        while lo <= hi:
            if lo % 2 == 1:
                out.append((lvl, lo))
                lo += 1
            if hi % 2 == 0 and lo <= hi:
                out.append((lvl, hi))
                hi -= 1
            lo, hi, lvl = lo // 2, (hi - 1) // 2 if hi >= 0 else -1, lvl + 1
            if lo > hi:
                break
        return out

    def query(self, lo: int, hi: int) -> np.ndarray:
        """Noisy Σ leaves[lo..hi] (inclusive), shape (...,)."""
        nodes = self.canonical_nodes(lo, hi)
        shape = self.levels[0].shape[:-1]
        return sum((self.levels[l][..., i] for l, i in nodes), np.zeros(shape))

    def state_bytes(self) -> bytes:
        return b"".join(np.ascontiguousarray(l).tobytes() for l in self.levels)


class DPTreeDistance:
    """1-D weighted distance structure: points x (..., n) in [−X, X], weights w (..., n) in [−W, W].

    X and W are public (broadcastable to the leading shape); points and weights are clipped to them here.
    """

    def __init__(
        self,
        x: np.ndarray,
        w: np.ndarray,
        x_bound: np.ndarray | float,
        w_bound: float,
        epsilon: float,
        bins: int = 64,
        sampler: NoiseSampler | None = None,
    ) -> None:
        sampler = sampler or SecureSampler()
        x = np.asarray(x, np.float64)
        self.x_bound = np.broadcast_to(np.asarray(x_bound, np.float64), x.shape[:-1]).copy()
        xb = self.x_bound[..., None]
        x = np.clip(x, -xb, xb)
        w = np.clip(np.asarray(w, np.float64), -w_bound, w_bound)
        self.bins = bins
        b = self._bin(x)
        lead = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
        flat_b = b.reshape(lead, -1) + (np.arange(lead) * bins)[:, None]

        def leafsum(vals: np.ndarray) -> np.ndarray:
            return np.bincount(flat_b.ravel(), weights=vals.reshape(lead, -1).ravel(), minlength=lead * bins).reshape(
                x.shape[:-1] + (bins,)
            )

        e3 = epsilon / 3  # three trees share the structure's budget
        # replace-one L1 sensitivities: a row leaves one bin and enters another
        self.T_W = DPTree(leafsum(w), e3, 2 * w_bound, sampler)
        # T_S and T_Q hold leaves rescaled by X and X² (|w·x/X| ≤ W), so every tree has Δ₁ = 2W and one
        # Laplace scale; totals() undoes the rescaling (post-processing)
        safe = np.where(self.x_bound > 0, self.x_bound, 1.0)[..., None]
        self.T_S = DPTree(leafsum(w * x) / safe, e3, 2 * w_bound, sampler)
        self.T_Q = DPTree(leafsum(w * x * x) / safe**2, e3, 2 * w_bound, sampler)
        self._safe = safe[..., 0]

    def _bin(self, x: np.ndarray) -> np.ndarray:
        xb = np.where(self.x_bound > 0, self.x_bound, 1.0)[..., None]
        return np.clip(((x + xb) / (2 * xb) * self.bins).astype(np.int64), 0, self.bins - 1)

    def totals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Noisy (Σw, Σw·x, Σw·x²) over the full range (the root nodes)."""
        full = (0, self.bins - 1)
        return self.T_W.query(*full), self.T_S.query(*full) * self._safe, self.T_Q.query(*full) * self._safe**2

    def l2sq(self, y: np.ndarray) -> np.ndarray:
        """Σ w_i (y − x_i)² = y²W − 2yS + Q for y (...) broadcast against the leading shape."""
        W, S, Q = self.totals()
        return y * y * W - 2 * y * S + Q

    def l1(self, y: float) -> np.ndarray:
        """Σ w_i |y − x_i| split at y's bin (points in y's bin count as ≤ y): y(W≤ − W>) − (S≤ − S>).
        Scalar structures only (one X); the bin split costs at most 2·(bin width)·Σ_{same bin}|w|."""
        if self.x_bound.ndim:
            raise ValueError("l1 queries need a single 1-D structure (no leading axes)")
        yb = int(self._bin(np.asarray([float(y)]))[0])
        w_le, w_gt = self.T_W.query(0, yb), self.T_W.query(yb + 1, self.bins - 1)
        s_le = self.T_S.query(0, yb) * self._safe
        s_gt = self.T_S.query(yb + 1, self.bins - 1) * self._safe
        return y * (w_le - w_gt) - (s_le - s_gt)


class DPTreeSoftmax:
    """DP attention for one head from per-(feature, value column) DPTreeDistance structures.

    Args:
        K (n, d), V (n, d_v): private keys and values (clipped to ``bounds`` here).
        spec: kernel. bounds: public R, R_w. epsilon, delta: the budget of THIS head's structures
        (``releases`` > 1 splits a joint budget over that many heads by advanced composition).
    """

    def __init__(
        self,
        K: np.ndarray,
        V: np.ndarray,
        spec: KernelSpec,
        bounds: PublicBounds,
        epsilon: float,
        delta: float,
        *,
        releases: int = 1,
        bins: int = 64,
        sampler: NoiseSampler | None = None,
    ) -> None:
        from pipeline.privacy.features import monomials

        K, V = clip_rows(K, V, bounds)
        self.spec, self.bounds, self.n = spec, bounds, int(K.shape[0])
        dv = V.shape[1]
        idx, coef = monomials(spec.d, spec.degree, spec.scale)
        order = (idx < spec.d).sum(1)
        x_bound = coef * bounds.key_bound**order  # (r,): |φ_j(k)| ≤ coef_j·R^{|α_j|}
        phi = spec.features(K).T  # (r, n)
        W = np.concatenate(
            [V, np.ones((V.shape[0], 1))], axis=1
        ).T  # (d_v+1, n); the ones column has bound 1 ≤ max(R_w, 1)
        self.structures = dv + 1
        k = spec.r * (dv + 1) * releases
        self.epsilon_each = advanced_composition_epsilon(epsilon, delta, k)
        x = np.broadcast_to(phi[:, None, :], (spec.r, dv + 1, self.n))
        w = np.broadcast_to(W[None, :, :], (spec.r, dv + 1, self.n))
        xb = np.broadcast_to(x_bound[:, None], (spec.r, dv + 1))
        self.dist = DPTreeDistance(
            x, w, xb, max(bounds.value_bound, 1.0), self.epsilon_each, bins=bins, sampler=sampler
        )

    def effective_sums(self) -> np.ndarray:
        """(r, d_v+1): the post-processed state φ(q)ᵀ· this = the structure's answer (T_S roots)."""
        return self.dist.totals()[1]

    def answer(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(out (..., d_v), guarded (...)) through the ℓ2² identity, for queries q (..., d)."""
        phi_q = self.spec.features(q)  # (..., r)
        Wt, St, Qt = self.dist.totals()  # (r, d_v+1) each
        y = phi_q[..., None]  # (..., r, 1)
        l2 = y * y * Wt - 2 * y * St + Qt
        per = 0.5 * (y * y * Wt + Qt - l2)  # (..., r, d_v+1) = φ_j(q)·Σ w φ_j(k)
        nd = per.sum(-2)
        floor = guard_floor(q, self.n, self.spec, self.bounds)
        num, den = nd[..., :-1], nd[..., -1]
        guarded = den < floor
        den_g = np.maximum(den, floor)
        return np.clip(num / den_g[..., None], -self.bounds.value_bound, self.bounds.value_bound), guarded

    def answer_via_sums(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out, _, guarded = answer_from_sums(
            self.spec.features(q),
            self.effective_sums(),
            guard_floor(q, self.n, self.spec, self.bounds),
            self.bounds.value_bound,
        )
        return out, guarded
