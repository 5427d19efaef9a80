"""Privacy accounting across the releases of every replaced head and layer.

A context row (one private key/value position) enters every replaced head's release, so the m releases
compose. All of them are Gaussian: releasing S_j + N(0, σ_j²) with sensitivities Δ_j is, jointly, one
Gaussian mechanism with μ = sqrt(Σ_j (Δ_j/σ_j)²) (concatenate and rescale each block), whose exact δ(ε) is
the analytic-Gaussian formula at Δ/σ = μ. Two plans [I, configurable]:

* ``gaussian_joint`` (default): the same noise multiplier z = σ_j/Δ_j for every release, z chosen so the
  joint mechanism is exactly (ε, δ)-DP: z = sqrt(m)·σ_analytic(ε, δ, Δ=1). Tight for Gaussians.
* ``basic``: each release gets (ε/m, δ/m) by the analytic Gaussian; basic composition. Looser (more noise),
  kept for comparison with per-release budgets.

:func:`advanced_composition_epsilon` gives the per-structure ε' of k pure-ε' mechanisms under the advanced
composition theorem (Dwork, Rothblum & Vadhan 2010), used by the DPTree structures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.privacy.calibration import analytic_gaussian_sigma, check_privacy_params, gaussian_delta

__all__ = ["ACCOUNTING_METHODS", "NoisePlan", "advanced_composition_epsilon", "joint_delta", "plan_gaussian"]

ACCOUNTING_METHODS = ("gaussian_joint", "basic")


@dataclass(frozen=True)
class NoisePlan:
    method: str
    epsilon: float
    delta: float
    sigmas: tuple[float, ...]
    sensitivities: tuple[float, ...]
    exact_delta: float  # the δ(ε) of the noise actually used, over all releases jointly

    @property
    def noise_multipliers(self) -> tuple[float, ...]:
        return tuple(s / d for s, d in zip(self.sigmas, self.sensitivities))


def joint_delta(epsilon: float, sigmas: Sequence[float], sensitivities: Sequence[float]) -> float:
    """Exact δ(ε) of the composition of Gaussian releases: analytic Gaussian at μ = sqrt(Σ (Δ_j/σ_j)²)."""
    mu = math.sqrt(sum((d / s) ** 2 for s, d in zip(sigmas, sensitivities)))
    return gaussian_delta(epsilon, 1.0, mu)


def plan_gaussian(
    epsilon: float, delta: float, sensitivities: Sequence[float], method: str = "gaussian_joint"
) -> NoisePlan:
    """σ per release so that all releases together are (ε, δ)-DP for one changed context row.

    Raises:
        ConfigError: invalid ε/δ. ValueError: unknown method, no releases, a sensitivity ≤ 0.
    """
    check_privacy_params(epsilon, delta)
    m = len(sensitivities)
    if m == 0 or min(sensitivities) <= 0:
        raise ValueError(f"need at least one release with positive sensitivity, got {list(sensitivities)}")
    if method == "gaussian_joint":
        z = math.sqrt(m) * analytic_gaussian_sigma(epsilon, delta, 1.0)
        sigmas = tuple(z * d for d in sensitivities)
    elif method == "basic":
        sigmas = tuple(analytic_gaussian_sigma(epsilon / m, delta / m, d) for d in sensitivities)
    else:
        raise ValueError(f"accounting must be one of {ACCOUNTING_METHODS}, got {method!r}")
    return NoisePlan(
        method,
        float(epsilon),
        float(delta),
        sigmas,
        tuple(float(d) for d in sensitivities),
        joint_delta(epsilon, sigmas, sensitivities),
    )


def advanced_composition_epsilon(epsilon: float, delta: float, k: int) -> float:
    """Largest ε' with sqrt(2k ln(1/δ))·ε' + k·ε'(e^{ε'} − 1) ≤ ε: k pure ε'-DP mechanisms are (ε, δ)-DP."""
    check_privacy_params(epsilon, delta)

    def total(e: float) -> float:
        if e > 700:
            return math.inf
        return math.sqrt(2 * k * math.log(1 / delta)) * e + k * e * math.expm1(e)

    lo, hi = 0.0, epsilon
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if total(mid) <= epsilon else (lo, mid)
    return lo
