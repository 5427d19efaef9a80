"""Noise calibration: the analytic Gaussian mechanism (Balle & Wang, ICML 2018), the classical bound for
comparison, the Laplace scale, and the privacy-parameter checks every entry point runs first.

For a Gaussian mechanism with L2 sensitivity Δ and noise σ, the exact δ at a given ε is (Balle & Wang, Thm 8)

    δ(ε) = Φ(Δ/(2σ) − εσ/Δ) − e^ε · Φ(−Δ/(2σ) − εσ/Δ)

and (ε, δ)-DP holds iff δ(ε) ≤ δ. :func:`analytic_gaussian_sigma` returns the smallest such σ (bisection on
this formula), valid for every ε > 0; the classical σ = Δ·sqrt(2 ln(1.25/δ))/ε is valid only for ε < 1 in
its proof and fails outright above ε ≈ 8.4 at δ = 1e-5 (see :func:`gaussian_delta`).
"""

from __future__ import annotations

import math

from pipeline.errors import ConfigError

__all__ = [
    "analytic_gaussian_sigma",
    "check_privacy_params",
    "classical_gaussian_sigma",
    "gaussian_delta",
    "gaussian_epsilon",
    "laplace_scale",
    "log_ndtr",
]


def check_privacy_params(
    epsilon: object, delta: object, key_bound: object = 1.0, value_bound: object = 1.0, *, where: str = "privacy"
) -> None:
    """Refuse invalid privacy parameters with one line naming the key.

    Raises:
        ConfigError: ε not a finite number > 0, δ not in (0, 1), or a bound missing / not finite > 0.
    """

    def num(v: object) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    e, dl = num(epsilon), num(delta)
    if e is None or not (math.isfinite(e) and e > 0):
        raise ConfigError(f"{where}: epsilon must be a finite number > 0, got {epsilon!r}")
    if dl is None or not (0.0 < dl < 1.0):
        raise ConfigError(f"{where}: delta must lie in (0, 1), got {delta!r}")
    for name, v in (("key_bound", key_bound), ("value_bound", value_bound)):
        b = num(v)
        if v is None:
            raise ConfigError(f"{where}: {name} is missing: the mechanism needs a public bound (it clips to it)")
        if b is None or not (math.isfinite(b) and b > 0):
            raise ConfigError(f"{where}: {name} must be a finite number > 0, got {v!r}")


def log_ndtr(x: float) -> float:
    """log Φ(x) for the standard normal CDF, accurate in the far left tail (asymptotic series below −20)."""
    if x > -20.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Φ(x) = φ(x)/|x| · (1 − 1/x² + 3/x⁴ − 15/x⁶ + ...)
    x2 = x * x
    series = 1.0 - 1.0 / x2 + 3.0 / x2**2 - 15.0 / x2**3 + 105.0 / x2**4
    return -0.5 * x2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log(series)


def gaussian_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """Exact δ of the Gaussian mechanism N(0, σ²) with L2 sensitivity Δ at privacy level ε (Balle & Wang Thm 8)."""
    if sigma <= 0 or sensitivity <= 0:
        raise ValueError(f"need sigma > 0 and sensitivity > 0, got {sigma}, {sensitivity}")
    a = sensitivity / (2 * sigma) - epsilon * sigma / sensitivity
    b = -sensitivity / (2 * sigma) - epsilon * sigma / sensitivity
    la, lb = log_ndtr(a), log_ndtr(b) + epsilon
    if lb >= la:
        return 0.0
    return float(math.exp(la) * -math.expm1(lb - la))


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0, *, rtol: float = 1e-12) -> float:
    """Smallest σ with gaussian_delta(ε, σ, Δ) ≤ δ (δ(σ) is decreasing in σ), by bisection to ``rtol``."""
    check_privacy_params(epsilon, delta)
    lo, hi = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(epsilon, hi, sensitivity) > delta:
        lo, hi = hi, hi * 2
    while gaussian_delta(epsilon, lo, sensitivity) <= delta and lo > 1e-300:
        lo /= 2
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if gaussian_delta(epsilon, mid, sensitivity) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def classical_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """The textbook σ = Δ·sqrt(2 ln(1.25/δ))/ε (Dwork & Roth Thm A.1; proven for ε < 1 only)."""
    check_privacy_params(epsilon, delta)
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The ε at which a Gaussian mechanism with Δ/σ = μ has exact δ(ε) = δ (0 when δ(0) ≤ δ)."""
    if mu <= 0 or gaussian_delta(0.0, 1.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, 1.0, mu) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, 1.0, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def laplace_scale(epsilon: float, l1_sensitivity: float) -> float:
    """b = Δ₁/ε for the Laplace mechanism (pure ε-DP)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ConfigError(f"privacy: epsilon must be a finite number > 0, got {epsilon!r}")
    return l1_sensitivity / epsilon
