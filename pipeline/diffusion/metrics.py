"""Measurements against the exact mixture: score error, empirical Lipschitz constant, histogram TV.

* :func:`score_mse`: ε_score² = E_t E_{x~p_t}‖ŝ(x, t) − ∇log p_t(x)‖², t uniform in OU time on [δ, T] (for the
  ``ou`` schedule: uniform in t), by Monte Carlo with the closed-form score (edgepipe's check).
* :func:`jacobian_opnorm`: ‖∇_x ŝ(x, t)‖_op per point, by autograd (one backward pass per output coordinate);
  :func:`finite_difference_opnorm` the same from central differences, for ONNX models.
* :func:`histogram_tv`: TV between samples and the exact p_0 on a regular grid (d ≤ 3); the exact bin masses come
  from midpoint quadrature of the closed-form density, so the only noise is the samples' own. The same call on n
  exact draws gives the estimator's floor for n samples (:func:`histogram_tv_floor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pipeline.diffusion.gmm import GaussianMixture, Schedule

__all__ = [
    "MAX_HISTOGRAM_DIM",
    "finite_difference_opnorm",
    "histogram_kl",
    "histogram_tv",
    "histogram_tv_floor",
    "jacobian_opnorm",
    "score_error_points",
    "score_mse",
]

Tensor = torch.Tensor
MAX_HISTOGRAM_DIM = 3


def score_error_points(
    gmm: GaussianMixture,
    n: int,
    *,
    T: float,
    delta: float,
    schedule: Schedule = Schedule(),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(x (n, d), t (n,), exact score (n, d)) with s(t) uniform on [s(δ), s(T)] and x ~ p_t, all float64."""
    s_lo = schedule.s(torch.tensor(delta, dtype=torch.float64))
    s_hi = schedule.s(torch.tensor(T, dtype=torch.float64))
    u = torch.rand(n, dtype=torch.float64, generator=generator)
    t = schedule.t_of_s(s_lo + (s_hi - s_lo) * u)
    x = gmm.sample_t(t, generator=generator, schedule=schedule)
    return x, t, gmm.score(x, t, schedule)


def score_mse(predicted: Tensor, exact: Tensor) -> dict[str, float]:
    """``{"mse": mean ‖ŝ − s‖², "relative": mse / mean ‖s‖²}`` for (n, d) predicted and exact scores."""
    p = torch.as_tensor(predicted, dtype=torch.float64)
    if not torch.isfinite(p).all():
        return {"mse": math.inf, "relative": math.inf}
    err = ((p - exact) ** 2).sum(1).mean()
    return {"mse": float(err), "relative": float(err / (exact**2).sum(1).mean())}


def jacobian_opnorm(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> Tensor:
    """‖∂fn(x, t)/∂x‖_op for each row of x (n, d) at times t (n,); fn maps rows independently. Returns (n,)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x, t)
        rows = [torch.autograd.grad(out[:, j].sum(), x, retain_graph=True)[0] for j in range(out.shape[1])]
    jac = torch.stack(rows, dim=1)  # (n, d_out, d_in)
    return torch.linalg.matrix_norm(jac.to(torch.float64), ord=2)


def finite_difference_opnorm(
    fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, *, h: float = 1e-2
) -> Tensor:
    """‖J‖_op per row with J from central differences of step h: works for any backend (an int8 ONNX graph has no
    autograd). Returns (n,). Quantized graphs are piecewise flat with jumps, so this is h-dependent there."""
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    cols = [(fn(x + h * eye[j], t) - fn(x - h * eye[j], t)) / (2 * h) for j in range(x.shape[1])]
    return torch.linalg.matrix_norm(torch.stack(cols, dim=2).to(torch.float64), ord=2)


def _box(gmm: GaussianMixture, width: float = 5.0) -> tuple[Tensor, Tensor]:
    sd = torch.sqrt(torch.diagonal(gmm.covs, dim1=1, dim2=2))  # (k, d) marginal stds
    return (gmm.means - width * sd).min(0).values, (gmm.means + width * sd).max(0).values


def _bin_masses(gmm: GaussianMixture, lo: Tensor, hi: Tensor, bins: int, sub: int) -> Tensor:
    """Exact-density bin masses on the grid (bins^d,), midpoint rule with ``sub`` points per bin and axis."""
    d = gmm.d
    fine = bins * sub
    edges = [torch.linspace(float(lo[j]), float(hi[j]), fine + 1, dtype=torch.float64) for j in range(d)]
    mids = [0.5 * (e[1:] + e[:-1]) for e in edges]
    cell = math.prod(float((hi[j] - lo[j]) / fine) for j in range(d))
    pts = torch.stack(torch.meshgrid(*mids, indexing="ij"), dim=-1).reshape(-1, d)
    dens = torch.cat([gmm.log_prob(p).exp() for p in pts.split(1 << 16)]) * cell
    dens = dens.reshape((fine,) * d)
    for axis in range(d):  # sum each bin's sub-cells
        shape = list(dens.shape)
        shape[axis : axis + 1] = [bins, sub]
        dens = dens.reshape(shape).sum(axis + 1)
    return dens.reshape(-1)


def _histograms(samples: Tensor, gmm: GaussianMixture, bins: int | None, sub: int) -> tuple[Tensor, Tensor]:
    """(empirical, exact) masses of the ``bins``^d grid cells plus a last entry for everything outside the grid."""
    x = torch.as_tensor(samples, dtype=torch.float64)
    d = gmm.d
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"samples must be (n, {d}), got {tuple(x.shape)}")
    if d > MAX_HISTOGRAM_DIM:
        raise ValueError(f"histogram TV needs d <= {MAX_HISTOGRAM_DIM}, got d={d}")
    bins = bins or {1: 80, 2: 40, 3: 16}[d]
    lo, hi = _box(gmm)
    p = _bin_masses(gmm, lo, hi, bins, sub)
    p = torch.cat([p, torch.tensor([max(0.0, 1.0 - float(p.sum()))], dtype=torch.float64)])
    ok = torch.isfinite(x).all(1)
    idx = torch.floor((x[ok] - lo) / (hi - lo) * bins).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    flat = torch.zeros(len(idx), dtype=torch.long)
    for j in range(d):
        flat = flat * bins + idx[:, j].clamp(0, bins - 1)
    counts = torch.bincount(flat[inside], minlength=bins**d).to(torch.float64) / x.shape[0]
    return torch.cat([counts, (1.0 - counts.sum()).clamp_min(0).reshape(1)]), p


def histogram_tv(samples: Tensor, gmm: GaussianMixture, *, bins: int | None = None, sub: int = 4) -> float:
    """½ Σ_b |p̂_b − p_b| over a regular grid of ``bins``^d cells covering p_0 (±5 std) plus one cell for the outside.

    Args:
        samples: (n, d) draws to test; non-finite rows count as outside the grid.
        gmm: the exact p_0.
        bins: cells per axis; default 40 (d=1: 80, d=3: 16).
        sub: quadrature points per cell and axis for the exact masses.

    Raises:
        ValueError: d > 3 (the grid would be too coarse to mean anything) or a shape mismatch.
    """
    q, p = _histograms(samples, gmm, bins, sub)
    return 0.5 * float((q - p).abs().sum())


def histogram_kl(samples: Tensor, gmm: GaussianMixture, *, bins: int | None = None, sub: int = 4) -> float:
    """KL(p̂ ‖ p_0) between the same binned distributions as :func:`histogram_tv` (nats; plug-in estimate, biased
    upward by about (occupied cells − 1) / (2n)). Cells where p_0's mass underflows to 0 count with a 1e-300 floor."""
    q, p = _histograms(samples, gmm, bins, sub)
    m = q > 0
    return float((q[m] * (torch.log(q[m]) - torch.log(p[m].clamp_min(1e-300)))).sum())


def histogram_tv_floor(
    gmm: GaussianMixture, n: int, *, generator: torch.Generator | None = None, bins: int | None = None
) -> float:
    """:func:`histogram_tv` of n exact draws: what the estimator reports for a perfect sampler with n samples."""
    return histogram_tv(gmm.sample(n, generator=generator), gmm, bins=bins)
