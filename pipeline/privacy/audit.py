"""Privacy audits of a release (issue 14 verify_dp (a): sensitivity search, exact delta, privacy-loss audit).

* :func:`sensitivity_search` — search replace-one neighbour rows (k, v), (k', v') inside the public box
  for the largest ‖φ(k)[v,1] − φ(k')[v',1]‖_F and report its ratio to the bound Δ₂ (must be ≤ 1).
* :func:`privacy_loss_audit` — a distinguishing attack between neighbouring context sets D, D' that differ
  in the worst row found above. The attacker issues ``repeats`` queries of the linear functional
  ⟨S̃, u⟩ (u = the normalised difference S(D) − S(D'), which is what a query φ(q) aligned with the
  difference reads out) and averages them. Over many independent builds it measures the separation
  μ̂ = |mean_D − mean_D'| / std and converts it to the ε at which a Gaussian with that separation reaches δ
  (exact, Balle & Wang); a lower confidence bound above the claimed ε flags the mechanism. A control that
  redraws the noise for every query (the broken variant) must be flagged: averaging R fresh draws shrinks
  the noise by sqrt(R). The correct release answers every repeat from the same S̃ and is not.
* :func:`state_hash` / :func:`adaptive_stream_unchanged` — hash of the released state before and after
  an adaptive query stream.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.privacy.calibration import gaussian_epsilon
from pipeline.privacy.release import KernelSpec, PublicBounds, replace_one_sensitivity
from pipeline.privacy.sampler import NoiseSampler, SecureSampler

__all__ = [
    "AuditResult",
    "SensitivityResult",
    "adaptive_stream_unchanged",
    "privacy_loss_audit",
    "sensitivity_search",
    "state_hash",
]


@dataclass(frozen=True)
class SensitivityResult:
    found: float
    bound: float
    k: np.ndarray
    v: np.ndarray
    k2: np.ndarray
    v2: np.ndarray

    @property
    def ratio(self) -> float:
        return self.found / self.bound


def _row_block(spec: KernelSpec, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """φ(k)[v, 1]: (m, d), (m, d_v) -> (m, r, d_v+1)."""
    phi = spec.features(k)
    u = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], axis=-1)
    return phi[..., :, None] * u[..., None, :]


def sensitivity_search(
    spec: KernelSpec,
    bounds: PublicBounds,
    dv: int,
    *,
    trials: int = 2000,
    steps: int = 3,
    rng: np.random.Generator | None = None,
) -> SensitivityResult:
    """Random corner and interior pairs, then coordinate flips/scalings on the best pairs (deterministic for
    a given ``rng``). Returns the largest replace-one difference found and the bound Δ₂."""
    rng = rng or np.random.default_rng(0)
    R, Rw = bounds.key_bound, bounds.value_bound
    d = spec.d

    def sample(m: int) -> tuple[np.ndarray, np.ndarray]:
        corner = rng.random(m) < 0.7
        k = np.where(corner[:, None], R * rng.choice([-1.0, 1.0], (m, d)), rng.uniform(-R, R, (m, d)))
        v = Rw * rng.choice([-1.0, 1.0], (m, dv))
        return k, v

    k, v = sample(trials)
    k2, v2 = sample(trials)

    def score(a, b, c, e):
        return np.linalg.norm((_row_block(spec, a, b) - _row_block(spec, c, e)).reshape(len(a), -1), axis=1)

    s = score(k, v, k2, v2)
    top = np.argsort(s)[-16:]
    k, v, k2, v2, s = k[top], v[top], k2[top], v2[top], s[top]
    for _ in range(steps):  # greedy coordinate moves: flip / zero one key entry of either row
        for j in range(d):
            for which in (0, 1):
                for op in (-1.0, 0.0):
                    kk, kk2 = k.copy(), k2.copy()
                    if which == 0:
                        kk[:, j] *= op
                    else:
                        kk2[:, j] *= op
                    s_new = score(kk, v, kk2, v2)
                    better = s_new > s
                    k[better], k2[better], s[better] = kk[better], kk2[better], s_new[better]
    i = int(np.argmax(s))
    return SensitivityResult(float(s[i]), replace_one_sensitivity(spec, bounds, dv), k[i], v[i], k2[i], v2[i])


@dataclass(frozen=True)
class AuditResult:
    mu_hat: float  # measured separation in noise standard deviations (per release)
    epsilon_measured: float  # ε at δ of a Gaussian with the measured separation (joint over `releases`)
    epsilon_lower: float  # the same at a 3-standard-error lower bound of μ̂
    epsilon_claimed: float
    flagged: bool


def privacy_loss_audit(
    S_D: np.ndarray,
    S_D2: np.ndarray,
    sigma: float,
    epsilon: float,
    delta: float,
    *,
    releases: int = 1,
    trials: int = 2000,
    repeats: int = 64,
    redraw_per_query: bool = False,
    sampler: NoiseSampler | None = None,
) -> AuditResult:
    """Distinguish S̃ = S(D) + N from S(D') + N (see the module doc).

    Args:
        S_D, S_D2: exact sums (r, d_v+1) of the two neighbouring sets. sigma: the noise of this release.
        releases: how many releases with the same Δ/σ the row enters (Gaussian composition is exact, so the
            joint separation is sqrt(releases)·μ̂).
        redraw_per_query: the broken control.
    """
    sampler = sampler or SecureSampler()
    diff = S_D - S_D2
    u = diff / np.linalg.norm(diff)
    stats = []
    for S in (S_D, S_D2):
        t = np.empty(trials)
        for i in range(trials):
            if redraw_per_query:  # every query sees a fresh noisy state
                noise = sampler.normal((repeats,) + S.shape, sigma)
                t[i] = float(np.mean(np.tensordot(noise, u, axes=2))) + float(np.sum(S * u))
            else:  # one build, `repeats` identical answers
                st = S + sampler.normal(S.shape, sigma)
                t[i] = float(np.mean([np.sum(st * u) for _ in range(min(repeats, 4))]))
        stats.append(t)
    a, b = stats
    sd = math.sqrt(0.5 * (a.var(ddof=1) + b.var(ddof=1)))
    mu = abs(a.mean() - b.mean()) / sd
    se = math.sqrt(2.0 / trials)  # standard error of μ̂ in sd units (difference of two means)
    scale = math.sqrt(releases)
    eps_m = gaussian_epsilon(scale * mu, delta)
    eps_lo = gaussian_epsilon(scale * max(mu - 3 * se, 0.0), delta)
    return AuditResult(float(mu), float(eps_m), float(eps_lo), float(epsilon), bool(eps_lo > epsilon))


def state_hash(arrays: Iterable[np.ndarray] = (), files: Iterable[str | os.PathLike[str]] = ()) -> str:
    """SHA-256 over the bytes of ``arrays`` then of ``files`` (paths), in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def adaptive_stream_unchanged(
    hash_fn: Callable[[], str],
    answer: Callable[[np.ndarray], np.ndarray],
    q0: np.ndarray,
    steps: int = 32,
    step: float = 0.5,
    rng: np.random.Generator | None = None,
) -> tuple[bool, str, str]:
    """Run an adaptive stream: each next query moves toward the direction of the last answer (plus random
    probes). Returns (unchanged, hash before, hash after)."""
    rng = rng or np.random.default_rng(0)
    before = hash_fn()
    q = np.asarray(q0, dtype=np.float32)
    for _ in range(steps):
        out = np.asarray(answer(q), dtype=np.float64)
        direction = np.resize(out.reshape(-1), q.size).reshape(q.shape)
        q = (q + step * np.sign(direction) + 0.1 * rng.standard_normal(q.shape)).astype(np.float32)
    after = hash_fn()
    return before == after, before, after
