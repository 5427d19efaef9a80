"""The noisy-feature-sum release of one attention head's private key/value set (arXiv 2407.14717, the oracle form).

Private data: keys K (n, d) and values V (n, d_v) of one head. Public: the bounds R (‖k‖∞ ≤ R) and R_w
(|V_ij| ≤ R_w), the kernel (degree s, scale) and the row count n (neighbouring sets replace one row, so n
does not change).

Build (provider side):   S = Σ_i φ(clip_R(k_i)) [clip_Rw(v_i)ᵀ, 1]  ∈ ℝ^{r×(d_v+1)},   S̃ = S + N(0, σ²I)
Query (device side):     num = φ(q)ᵀ S̃[:, :d_v],  den = φ(q)ᵀ S̃[:, d_v]
                         den_g = max(den, n·exp(−scale·R·‖q‖₁))          (public guard)
                         out = clip(num / den_g, −R_w, R_w)              (public guard)

Both guards use only public quantities (q, n, R, R_w), so they are post-processing. The true denominator
Σ_i exp(scale⟨q,k_i⟩) is at least n·exp(−scale·R·‖q‖₁) and a softmax average of values lies in [−R_w, R_w],
so each guard only moves an answer toward the feasible set. All noise is drawn once in
:func:`release_feature_sum`; answering queries never draws noise, so any adaptive query sequence is
post-processing of S̃.

Replace-one L2 sensitivity: ‖φ(k)uᵀ − φ(k')u'ᵀ‖_F ≤ ‖φ(k)‖‖u‖ + ‖φ(k')‖‖u'‖ ≤ 2·sup‖φ‖·sqrt(d_v R_w² + 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pipeline.privacy.accounting import NoisePlan, plan_gaussian
from pipeline.privacy.features import feature_count, feature_norm_bound, poly_features
from pipeline.privacy.sampler import NoiseSampler, SecureSampler

__all__ = [
    "FeatureSumRelease",
    "KernelSpec",
    "PublicBounds",
    "answer_from_sums",
    "clip_rows",
    "exact_attention",
    "exact_sums",
    "guard_floor",
    "noisy_layer_sums",
    "release_feature_sum",
    "replace_one_sensitivity",
    "uniform_attention",
]


@dataclass(frozen=True)
class PublicBounds:
    """R: bound on every key (and query) entry; R_w: bound on every value entry. Public by assumption."""

    key_bound: float
    value_bound: float


@dataclass(frozen=True)
class KernelSpec:
    """exp(scale·⟨q,k⟩) ≈ ⟨φ(q), φ(k)⟩ with monomials of degree ≤ ``degree`` in ``d`` variables."""

    d: int
    degree: int
    scale: float

    @property
    def r(self) -> int:
        return feature_count(self.d, self.degree)

    def features(self, x: np.ndarray) -> np.ndarray:
        return poly_features(x, self.degree, self.scale)


def clip_rows(K: np.ndarray, V: np.ndarray, bounds: PublicBounds) -> tuple[np.ndarray, np.ndarray]:
    """Entry-wise clipping to the public box: this, not the caller, is what makes the sensitivity bound hold."""
    K = np.clip(np.asarray(K, dtype=np.float64), -bounds.key_bound, bounds.key_bound)
    V = np.clip(np.asarray(V, dtype=np.float64), -bounds.value_bound, bounds.value_bound)
    if not (np.isfinite(K).all() and np.isfinite(V).all()):
        raise ValueError("private keys/values contain NaN")
    return K, V


def replace_one_sensitivity(spec: KernelSpec, bounds: PublicBounds, dv: int) -> float:
    """Δ₂ = 2·sqrt(T_s(scale·d·R²))·sqrt(d_v·R_w² + 1) for S under replace-one neighbours."""
    return (
        2.0
        * feature_norm_bound(spec.d, spec.degree, spec.scale, bounds.key_bound)
        * math.sqrt(dv * bounds.value_bound**2 + 1.0)
    )


def exact_sums(K: np.ndarray, V: np.ndarray, spec: KernelSpec, bounds: PublicBounds) -> np.ndarray:
    """S = Σ_i φ(k_i)[v_iᵀ, 1] after clipping: (n, d), (n, d_v) -> (r, d_v + 1), float64."""
    K, V = clip_rows(K, V, bounds)
    if K.shape[-1] != spec.d:
        raise ValueError(f"keys have dimension {K.shape[-1]}, kernel expects {spec.d}")
    phi = spec.features(K)  # (n, r)
    return phi.T @ np.concatenate([V, np.ones((V.shape[0], 1))], axis=1)


def guard_floor(q: np.ndarray, n: int, spec: KernelSpec, bounds: PublicBounds) -> np.ndarray:
    """n·exp(−scale·R·‖q‖₁): (..., d) -> (...): the smallest possible exact denominator (public)."""
    return n * np.exp(-spec.scale * bounds.key_bound * np.abs(np.asarray(q, dtype=np.float64)).sum(-1))


def answer_from_sums(
    phi_q: np.ndarray, S: np.ndarray, floor: np.ndarray, value_bound: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out (..., d_v), guarded denominator (...), guarded (...) bool) from φ(q) (..., r) and sums (r, d_v+1)."""
    nd = phi_q @ S  # (..., d_v + 1)
    num, den = nd[..., :-1], nd[..., -1]
    guarded = den < floor
    den_g = np.maximum(den, floor)
    out = np.clip(num / den_g[..., None], -value_bound, value_bound)
    return out, den_g, guarded


@dataclass(frozen=True)
class FeatureSumRelease:
    """What ships for one head: the noisy sums S̃ (r, d_v+1) and public metadata; never K or V."""

    sums: np.ndarray
    spec: KernelSpec
    bounds: PublicBounds
    n: int
    sigma: float
    sensitivity: float
    sampler: str

    def answer(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """DP attention for queries q (..., d): (out (..., d_v), guarded (...) bool). Draws no noise."""
        out, _, guarded = answer_from_sums(
            self.spec.features(q), self.sums, guard_floor(q, self.n, self.spec, self.bounds), self.bounds.value_bound
        )
        return out, guarded

    def state_hash(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.sums).tobytes()).hexdigest()


def release_feature_sum(
    K: np.ndarray,
    V: np.ndarray,
    spec: KernelSpec,
    bounds: PublicBounds,
    sigma: float,
    sampler: NoiseSampler | None = None,
) -> FeatureSumRelease:
    """Build S̃ = S + N(0, σ²) once. ``sigma`` comes from :mod:`pipeline.privacy.accounting` (σ ≥ 0; 0 = no
    noise, for kernel-only error checks, and then the result is not private)."""
    sampler = sampler or SecureSampler()
    S = exact_sums(K, V, spec, bounds)
    noisy = S + sampler.normal(S.shape, sigma) if sigma > 0 else S
    dv = S.shape[1] - 1
    return FeatureSumRelease(
        noisy,
        spec,
        bounds,
        int(np.asarray(K).shape[0]),
        float(sigma),
        replace_one_sensitivity(spec, bounds, dv),
        sampler.name if sigma > 0 else "none (not private)",
    )


def exact_attention(q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float) -> np.ndarray:
    """float64 oracle: softmax(scale·q Kᵀ) V, (..., d), (n, d), (n, d_v) -> (..., d_v)."""
    logits = scale * np.asarray(q, np.float64) @ np.asarray(K, np.float64).T
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    return (w @ np.asarray(V, np.float64)) / w.sum(-1, keepdims=True)


def uniform_attention(V: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The uniform-attention baseline: mean of the values for every query, broadcast to ``shape + (d_v,)``."""
    m = np.asarray(V, np.float64).mean(0)
    return np.broadcast_to(m, tuple(shape) + m.shape)


def noisy_layer_sums(
    kv: list[tuple[np.ndarray, np.ndarray]],
    spec: KernelSpec,
    bounds: PublicBounds,
    *,
    epsilon: float,
    delta: float,
    accounting: str = "gaussian_joint",
    proj: dict[int, np.ndarray] | None = None,
    sampler: NoiseSampler | None = None,
) -> tuple[dict[int, np.ndarray], NoisePlan]:
    """S̃ for every layer and KV head at once, all releases jointly (ε, δ)-DP for replacing one context row.

    Args:
        kv: per layer (K (H, n, d), V (H, n, d_v)), the private keys / values (provider side only).
        spec, bounds: the kernel (d = the projected dimension when ``proj``) and the public bounds R, R_w.
        epsilon, delta, accounting: the total budget over the L·H releases (:func:`plan_gaussian`).
        proj: layer -> (H, d, p) public projection applied to the keys first, or None.
        sampler: the noise source (default :class:`SecureSampler`); every draw happens here, once.

    Returns:
        (layer -> (H, r, d_v + 1) float32 noisy sums, the noise plan: σ per release, exact δ).
    """
    sampler = sampler or SecureSampler()
    dv = kv[0][1].shape[-1]
    m = len(kv) * kv[0][0].shape[0]
    plan = plan_gaussian(epsilon, delta, [replace_one_sensitivity(spec, bounds, dv)] * m, accounting)
    sums: dict[int, np.ndarray] = {}
    for layer, (K, V) in enumerate(kv):
        Kp = np.einsum("hnd,hdp->hnp", K, proj[layer]) if proj else K  # (H, n, p)
        S = np.stack([exact_sums(Kp[h], V[h], spec, bounds) for h in range(K.shape[0])])  # (H, r, d_v + 1)
        sums[layer] = (S + sampler.normal(S.shape, plan.sigmas[0])).astype(np.float32)
    return sums, plan
