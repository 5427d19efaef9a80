"""The k-independent bounds hold on random mixtures (k up to 64, d up to 8), and the certificate behaves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.diffusion.bounds import (
    early_stop_tv_bound,
    kl_to_standard_normal_bound,
    lipschitz_bound,
    lipschitz_region_radius,
    second_moment,
    tv_certificate,
)
from pipeline.diffusion.gmm import GaussianMixture, Schedule
from pipeline.diffusion.samplers import time_grid

CASES = [(1, 1), (2, 3), (9, 2), (64, 8), (33, 5)]


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("k,d", CASES)
def test_lipschitz_bound_holds(k, d, shared):
    g = torch.Generator().manual_seed(7 * k + d)
    gmm = GaussianMixture.random(k, d, generator=g, shared=shared)
    sch = Schedule()
    for t in (0.0, 0.01, 0.1, 0.5, 2.0):
        tt = torch.full((600,), t, dtype=torch.float64)
        x = gmm.sample_t(tt, generator=g)
        if shared:  # the global bound: also far outside the data
            x = torch.cat([x, 10 * torch.randn(200, d, dtype=torch.float64, generator=g)])
        else:  # the region bound: only points inside max_i ‖x − a μ_i‖ ≤ R count
            a = sch.alpha(torch.tensor(t, dtype=torch.float64))
            r = lipschitz_region_radius(gmm, t, sch)
            x = x[torch.cdist(x, a * gmm.means).max(1).values <= r]
        hess = gmm.hessian(x, t, sch)
        # k = 1 attains the bound exactly: allow only rounding
        assert float(torch.linalg.matrix_norm(hess, ord=2).max()) <= float(lipschitz_bound(gmm, t, sch)) * (1 + 1e-12)


def test_lipschitz_bound_does_not_grow_with_k():
    """Adding components inside the same span and covariance range never raises the bound (it has no k in it)."""
    base = GaussianMixture.from_dict({"means": [[-2.0, 0.0], [2.0, 0.0]], "stds": [0.5, 0.5]})
    g = torch.Generator().manual_seed(0)
    ang = torch.rand(62, dtype=torch.float64, generator=g) * math.pi
    many = torch.cat([base.means, 2 * torch.stack([torch.cos(ang), torch.sin(ang) * 0], 1)])
    big = GaussianMixture.from_dict({"means": many.tolist(), "stds": [0.5] * 64})
    t = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64)
    assert torch.allclose(lipschitz_bound(big, t), lipschitz_bound(base, t))


@pytest.mark.parametrize("k,d", CASES)
def test_second_moment_and_kl_bound_against_monte_carlo(k, d):
    g = torch.Generator().manual_seed(k + 100 * d)
    gmm = GaussianMixture.random(k, d, generator=g)
    sch = Schedule("vp-linear")
    t = torch.full((40_000,), 0.2, dtype=torch.float64)
    sq = (gmm.sample_t(t, generator=g, schedule=sch) ** 2).sum(1)
    m2 = float(second_moment(gmm, 0.2, sch))
    assert abs(float(sq.mean()) - m2) <= 4 * float(sq.std()) / math.sqrt(len(sq))  # 4 standard errors
    x0 = gmm.sample(20_000, generator=g)
    log_ratio = gmm.log_prob(x0) + 0.5 * (x0**2).sum(1) + 0.5 * d * math.log(2 * math.pi)  # log p_0 − log N(0, I)
    kl_mc, se = float(log_ratio.mean()), float(log_ratio.std()) / math.sqrt(len(log_ratio))
    assert kl_mc <= kl_to_standard_normal_bound(gmm) + 4 * se


def test_early_stop_bound_is_small_and_monotone():
    gmm = GaussianMixture.random(4, 2, generator=torch.Generator().manual_seed(1))
    vals = [early_stop_tv_bound(gmm, d) for d in (0.0, 1e-4, 1e-3, 1e-2)]
    assert vals[0] == 0.0 and all(a < b for a, b in itertools.pairwise(vals)) and vals[-1] < 0.5


def test_certificate_falls_with_steps_and_rises_with_score_error():
    gmm = GaussianMixture.from_dict({"means": [[-1.0], [1.0]], "stds": [0.6, 0.6]})
    sch = Schedule()
    certs = [tv_certificate(gmm, sch, time_grid(n, T=8.0, delta=1e-3), 0.0)["total"] for n in (50, 200, 800, 3200)]
    assert all(a > b for a, b in itertools.pairwise(certs))
    grid = time_grid(800, T=8.0, delta=1e-3)
    by_eps = [tv_certificate(gmm, sch, grid, e)["total"] for e in (0.0, 1e-3, 1e-2, 1e-1)]
    assert all(a < b for a, b in itertools.pairwise(by_eps))
    # the score term is sqrt(½ (T − δ) ε²)
    c = tv_certificate(gmm, sch, grid, 1e-2)
    assert c["score"] == pytest.approx(math.sqrt(0.5 * (8.0 - 1e-3) * 1e-2))
