"""k-independent smoothness bounds of a diffused Gaussian mixture and the TV certificate they give.

Source: arXiv 2405.16418, our derivation [V] of bounds of the type
arXiv 2405.16418 proves [C]; the solver analysis is Chen et al. 2023, "Sampling is as easy as learning the score" [R].

* Lipschitz (operator norm of the Hessian of log p_t), with β_t = a_t² min_i λ_min(Σ_i) + b_t²:
    - shared covariance: L_t ≤ 1/β_t + a_t² max_{i,j}‖μ_i − μ_j‖² / (4 β_t²)   on all of ℝ^d;
    - otherwise:         L_t ≤ 1/β_t + R² / β_t²   on the region max_i ‖x − a_t μ_i‖ ≤ R.
* Second moment: E_{p_t}‖x‖² = Σ_i α_i a_t² (‖μ_i‖² + tr Σ_i) + d b_t²   (exact).
* KL(p_0 ‖ N(0, I)) ≤ Σ_i α_i · ½(tr Σ_i + ‖μ_i‖² − d − ln det Σ_i)   (convexity).

None of them grows with the number of components k: each is a weighted average or a maximum over components.

The certificate (:func:`tv_certificate`) is the DDPM exponential-integrator bound written in OU time s with the
unknown absolute constants set to 1 — an **[I] choice**, so it is a calibrated estimate of the guarantee's size,
not a proof with the paper's constants:

    TV(p̂, p_0) ≤ TV(p_δ, p_0) + sqrt(½ · KL),
    KL = e^{−2S} KL(p_0‖N(0,I))                      (initialisation: p_S ≠ N(0, I), OU contraction)
       + ∫_{s_δ}^{S} ε_score(s)² ds                     (score error, Girsanov; ≈ (S − s_δ) ε²)
       + Σ_k L_k² (d h_k² + m_{2,k}² h_k³)              (discretisation: per step, L and m_2 at the step's noisier end)

with h_k the step length in OU time, L_k the Lipschitz bound at the step's less-noisy end, Pinsker for KL → TV and
TV(p_δ, p_0) ≤ Σ_i α_i sqrt(½ KL(N_{i,δ} ‖ N_{i,0})) (joint convexity of TV, then Pinsker per component).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.diffusion.gmm import GaussianMixture, Schedule

__all__ = [
    "beta_min",
    "early_stop_tv_bound",
    "kl_to_standard_normal_bound",
    "lipschitz_bound",
    "lipschitz_region_radius",
    "second_moment",
    "tv_certificate",
]

Tensor = torch.Tensor


def _t(t: Any) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def beta_min(gmm: GaussianMixture, t: Any, schedule: Schedule = Schedule()) -> Tensor:
    """β_t = a_t² min_i λ_min(Σ_i) + b_t², the smallest eigenvalue of any Σ_{i,t} (exact)."""
    t = _t(t)
    a, b = schedule.alpha(t), schedule.sigma(t)
    return a * a * gmm.eigvals.min() + b * b


def lipschitz_region_radius(
    gmm: GaussianMixture, t: Any, schedule: Schedule = Schedule(), *, sigmas: float | None = None
) -> Tensor:
    """R_t for unequal covariances: every point within ``sigmas`` component standard deviations (default
    sqrt(d) + 5, an [I] choice covering all but ~1e-6 of the mass in low dimension) of some component mean
    satisfies max_i ‖x − a_t μ_i‖ ≤ R_t."""
    t = _t(t)
    a, b = schedule.alpha(t), schedule.sigma(t)
    c = math.sqrt(gmm.d) + 5.0 if sigmas is None else float(sigmas)
    spread = torch.cdist(gmm.means, gmm.means).max()
    sd = torch.sqrt(a * a * gmm.eigvals.max() + b * b)
    return a * spread + c * sd


def lipschitz_bound(
    gmm: GaussianMixture, t: Any, schedule: Schedule = Schedule(), *, radius: Any | None = None
) -> Tensor:
    """Upper bound on ‖∇²log p_t(x)‖_op (the score's Lipschitz constant at time t), independent of k.

    Args:
        gmm: the data mixture p_0.
        t: time(s), any shape.
        schedule: the forward schedule.
        radius: R for the region bound (unequal covariances); ``None`` = :func:`lipschitz_region_radius`.
            Ignored for a shared covariance, whose bound holds globally.

    Returns:
        L_t, same shape as ``t``.
    """
    t = _t(t)
    beta = beta_min(gmm, t, schedule)
    if gmm.shared_covariance():
        a = schedule.alpha(t)
        spread2 = torch.cdist(gmm.means, gmm.means).max() ** 2
        return 1.0 / beta + a * a * spread2 / (4 * beta * beta)
    r = lipschitz_region_radius(gmm, t, schedule) if radius is None else _t(radius)
    return 1.0 / beta + r * r / (beta * beta)


def second_moment(gmm: GaussianMixture, t: Any = 0.0, schedule: Schedule = Schedule()) -> Tensor:
    """m_2² = E_{p_t}‖x‖² (exact): Σ_i α_i a_t² (‖μ_i‖² + tr Σ_i) + d b_t²."""
    t = _t(t)
    a, b = schedule.alpha(t), schedule.sigma(t)
    m0 = (gmm.weights * ((gmm.means**2).sum(1) + torch.diagonal(gmm.covs, dim1=1, dim2=2).sum(1))).sum()
    return a * a * m0 + gmm.d * b * b


def kl_to_standard_normal_bound(gmm: GaussianMixture) -> float:
    """Σ_i α_i KL(N(μ_i, Σ_i) ‖ N(0, I)) ≥ KL(p_0 ‖ N(0, I)) (joint convexity of KL)."""
    lam = gmm.eigvals
    per = 0.5 * (lam.sum(1) + (gmm.means**2).sum(1) - gmm.d - torch.log(lam).sum(1))
    return float((gmm.weights * per).sum())


def _kl_gauss(m1: Tensor, c1: Tensor, m0: Tensor, c0: Tensor) -> Tensor:
    """KL(N(m1, c1) ‖ N(m0, c0)) for batches (k, d), (k, d, d)."""
    d = m1.shape[-1]
    l0 = torch.linalg.cholesky(c0)
    sol = torch.cholesky_solve(c1, l0)
    diff = (m0 - m1)[..., None]
    maha = (diff * torch.cholesky_solve(diff, l0)).sum((-2, -1))
    logdet0 = 2 * torch.log(torch.diagonal(l0, dim1=-2, dim2=-1)).sum(-1)
    logdet1 = torch.linalg.slogdet(c1)[1]
    return 0.5 * (torch.diagonal(sol, dim1=-2, dim2=-1).sum(-1) + maha - d + logdet0 - logdet1)


def early_stop_tv_bound(gmm: GaussianMixture, delta: float, schedule: Schedule = Schedule()) -> float:
    """TV(p_δ, p_0) ≤ Σ_i α_i sqrt(½ KL(N_{i,δ} ‖ N_{i,0})): the cost of stopping the reverse process at δ > 0."""
    if delta <= 0:
        return 0.0
    pd = gmm.marginal(delta, schedule)
    kl = _kl_gauss(pd.means, pd.covs, gmm.means, gmm.covs).clamp_min(0)
    return float((gmm.weights * torch.sqrt(0.5 * kl).clamp(max=1.0)).sum())


def tv_certificate(gmm: GaussianMixture, schedule: Schedule, grid: Tensor, eps2: float) -> dict[str, float]:
    """The DDPM (exponential integrator) TV certificate for a sampler run on ``grid`` with a score of L² error ε².

    Args:
        gmm: the data mixture p_0.
        schedule: the forward schedule.
        grid: (N+1,) decreasing times t_0 = T > ... > t_N = δ the sampler steps through.
        eps2: ε_score² = E_t E_{x~p_t}‖ŝ − ∇log p_t‖², t uniform in OU time on [δ, T] (:func:`score_mse`).

    Returns:
        ``{"total", "initialization", "score", "discretization", "early_stop", "kl", "vacuous", "score_limited"}``:
        each term in TV units (``score_limited``: the total as steps → ∞, what this score error alone allows); ``total`` is **not** capped at 1, so two certificates stay comparable even when both are vacuous
        (``vacuous``: total ≥ 1, TV ≤ 1 holds anyway). Constants are set to 1 (module docstring; [I]).
    """
    grid = grid.to(torch.float64)
    s = schedule.s(grid)  # (N+1,) decreasing OU times
    S, s_delta = float(s[0]), float(s[-1])
    h = s[:-1] - s[1:]  # (N,) step lengths in OU time
    lo = grid[1:]  # each step's less-noisy end: largest L_t
    L = lipschitz_bound(gmm, lo, schedule)
    m2 = torch.maximum(second_moment(gmm, grid[:-1], schedule), second_moment(gmm, lo, schedule))
    kl_init = math.exp(-2 * S) * kl_to_standard_normal_bound(gmm)
    kl_score = (S - s_delta) * float(eps2)
    kl_disc = float((L * L * (gmm.d * h * h + m2 * h**3)).sum())
    early = early_stop_tv_bound(gmm, float(grid[-1]), schedule)
    kl = kl_init + kl_score + kl_disc
    tv = lambda v: math.sqrt(0.5 * max(v, 0.0))  # noqa: E731 - Pinsker
    return {
        "total": early + tv(kl),
        "initialization": tv(kl_init),
        "score": tv(kl_score),
        "discretization": tv(kl_disc),
        "early_stop": early,
        "kl": kl,
        "vacuous": early + tv(kl) >= 1.0,
        "score_limited": early + tv(kl_init + kl_score),
    }
