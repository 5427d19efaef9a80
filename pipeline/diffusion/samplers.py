"""Reverse-time samplers driven by a score function ``score_fn(x (n, d), t (n,)) -> (n, d)``.

* :func:`ddpm_sample`: DDPM with the exponential integrator (Chen et al. 2023 [R]; arXiv 2405.16418). In OU time s, one
  step from t_k to t_{k+1} (h = s_k − s_{k+1}) is
  ``Y ← e^h Y + 2(e^h − 1) ŝ(t_k, Y) + sqrt(e^{2h} − 1) ξ`` — for ``ou`` (s = t) exactly the notes' formula.
* :func:`probability_flow_sample`: the probability-flow ODE dY/ds = Y + ŝ (reverse OU time) with an
  exponential-integrator predictor ``Y ← e^h Y + (e^h − 1) ŝ(t_k, Y)`` and an optional overdamped-Langevin
  corrector at t_{k+1}: ``Y ← Y + η ŝ + sqrt(2η) ξ`` with η = ``corrector_step`` · b_{t_{k+1}}² (the DPOM recipe of
  arXiv 2405.16418 [C names, I step rule]).

Both start from Y ~ N(0, I) at t_0 = T and stop at δ = t_N (no final denoising step, so the output targets p_δ).
Time grids come from :func:`time_grid`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from pipeline.diffusion.gmm import Schedule

__all__ = ["ScoreFn", "ddpm_sample", "probability_flow_sample", "time_grid"]

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]
Spacing = Literal["uniform", "exponential"]


def time_grid(
    steps: int, *, T: float, delta: float, schedule: Schedule = Schedule(), spacing: Spacing = "exponential"
) -> Tensor:
    """(steps + 1,) decreasing times from T to δ.

    ``uniform`` spaces the OU time s evenly; ``exponential`` spaces log s evenly (geometric steps, small near δ
    where the score is least smooth; the default, an [I] choice that keeps the discretisation term of the
    certificate small for the same number of steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < delta < T:
        raise ValueError(f"need 0 < delta < T, got delta={delta}, T={T}")
    s_T = schedule.s(torch.tensor(T, dtype=torch.float64))
    s_d = schedule.s(torch.tensor(delta, dtype=torch.float64))
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if spacing == "uniform":
        s = s_T + (s_d - s_T) * u
    elif spacing == "exponential":
        s = torch.exp(torch.log(s_T) + (torch.log(s_d) - torch.log(s_T)) * u)
    else:
        raise ValueError(f"spacing must be 'uniform' or 'exponential', got {spacing!r}")
    grid = schedule.t_of_s(s)
    grid[0], grid[-1] = T, delta
    return grid


def _start(n: int, d: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    return torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype)


@torch.no_grad()
def ddpm_sample(
    score_fn: ScoreFn,
    n: int,
    d: int,
    grid: Tensor,
    *,
    schedule: Schedule = Schedule(),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """n samples by DDPM with the exponential integrator on ``grid`` (decreasing, from :func:`time_grid`).

    Args:
        score_fn: ŝ(x, t) for x (n, d) and t (n,), both of ``dtype``.
        n, d: number of samples and dimension.
        grid: (N+1,) decreasing times.
        schedule: the forward schedule the score belongs to.
        generator: seeded torch generator (noise is drawn in float64, then cast, so results do not depend on dtype).
        dtype: dtype the score function is called with.

    Returns:
        (n, d) samples of p_δ (approximately), float64.
    """
    y = _start(n, d, generator, torch.float64)
    s = schedule.s(grid.to(torch.float64))
    for k in range(len(grid) - 1):
        h = float(s[k] - s[k + 1])
        t = torch.full((n,), float(grid[k]), dtype=dtype)
        sc = score_fn(y.to(dtype), t).to(torch.float64)
        e = torch.exp(torch.tensor(h, dtype=torch.float64))
        xi = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = e * y + 2 * (e - 1) * sc + torch.sqrt(torch.expm1(torch.tensor(2 * h, dtype=torch.float64))) * xi
    return y


@torch.no_grad()
def probability_flow_sample(
    score_fn: ScoreFn,
    n: int,
    d: int,
    grid: Tensor,
    *,
    schedule: Schedule = Schedule(),
    corrector_steps: int = 1,
    corrector_step: float = 0.05,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """n samples by the probability-flow ODE (exponential predictor) plus a Langevin corrector after each step.

    Args:
        score_fn, n, d, grid, schedule, generator, dtype: as :func:`ddpm_sample`.
        corrector_steps: Langevin iterations after each predictor step (0 = plain ODE, deterministic given Y_0).
        corrector_step: Langevin step η as a fraction of b_t² (the noise variance at the corrector's time).

    Returns:
        (n, d) float64 samples.
    """
    y = _start(n, d, generator, torch.float64)
    s = schedule.s(grid.to(torch.float64))
    for k in range(len(grid) - 1):
        h = float(s[k] - s[k + 1])
        t = torch.full((n,), float(grid[k]), dtype=dtype)
        e = torch.exp(torch.tensor(h, dtype=torch.float64))
        y = e * y + (e - 1) * score_fn(y.to(dtype), t).to(torch.float64)
        t_next = grid[k + 1]
        eta = corrector_step * float(schedule.sigma(t_next.to(torch.float64)) ** 2)
        tn = torch.full((n,), float(t_next), dtype=dtype)
        for _ in range(corrector_steps):
            xi = torch.randn(n, d, generator=generator, dtype=torch.float64)
            y = y + eta * score_fn(y.to(dtype), tn).to(torch.float64) + (2 * eta) ** 0.5 * xi
    return y
