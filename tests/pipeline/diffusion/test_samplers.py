"""Samplers against the exact mixture: TV falls with steps, rises with score error (notes §5(d))."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.diffusion.gmm import GaussianMixture, Schedule
from pipeline.diffusion.metrics import (
    finite_difference_opnorm,
    histogram_kl,
    histogram_tv,
    histogram_tv_floor,
    jacobian_opnorm,
    score_mse,
)
from pipeline.diffusion.samplers import ddpm_sample, probability_flow_sample, time_grid

GMM_1D = GaussianMixture.from_dict({"weights": [0.3, 0.7], "means": [[-2.0], [2.0]], "stds": [0.5, 0.5]})
N = 20_000


def _tv(sampler, steps, bias=0.0, spacing="uniform", **kw):
    grid = time_grid(steps, T=8.0, delta=1e-3, spacing=spacing)
    fn = lambda x, t: GMM_1D.score(x, t) + bias  # noqa: E731 - constant score bias (notes §5(d))
    return histogram_tv(sampler(fn, N, 1, grid, generator=torch.Generator().manual_seed(0), **kw), GMM_1D)


def test_ddpm_tv_falls_with_steps():
    tvs = [_tv(ddpm_sample, n) for n in (10, 40, 160)]
    floor = histogram_tv_floor(GMM_1D, N, generator=torch.Generator().manual_seed(1))
    assert tvs[0] > tvs[1] > tvs[2]
    assert tvs[0] > 0.2 and tvs[2] < floor + 0.06


def test_ddpm_tv_rises_with_score_bias_roughly_linearly():
    tvs = [_tv(ddpm_sample, 100, bias=b) for b in (0.0, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in itertools.pairwise(tvs))
    # roughly linear in the bias (the ε_score·sqrt(T) term): doubling the bias roughly doubles the excess TV
    # (the notes measured 0.017 -> 0.052 -> 0.129 for 0.05 -> 0.1 -> 0.2: ratios 3.1 and 2.5)
    excess = [v - tvs[0] for v in tvs[1:]]
    assert all(1.5 < b / a < 3.2 for a, b in itertools.pairwise(excess)), excess


@pytest.mark.parametrize("corrector_steps", [0, 1])
def test_probability_flow_converges(corrector_steps):
    coarse = _tv(probability_flow_sample, 8, spacing="exponential", corrector_steps=corrector_steps)
    fine = _tv(probability_flow_sample, 60, spacing="exponential", corrector_steps=corrector_steps)
    assert fine < coarse and fine < 0.05


def test_vp_linear_schedule_samples_the_mixture():
    sch = Schedule("vp-linear", 0.1, 20.0)
    gmm = GaussianMixture.random(3, 2, generator=torch.Generator().manual_seed(4))
    grid = time_grid(60, T=1.0, delta=1e-3, schedule=sch)
    y = ddpm_sample(
        lambda x, t: gmm.score(x, t, sch), 10_000, 2, grid, schedule=sch, generator=torch.Generator().manual_seed(0)
    )
    floor = histogram_tv_floor(gmm, 10_000, generator=torch.Generator().manual_seed(2))
    assert histogram_tv(y, gmm) < floor + 0.04


def test_metrics_helpers():
    x = torch.randn(50, 3, dtype=torch.float64)
    a = torch.randn(3, 3, dtype=torch.float64)
    norms = jacobian_opnorm(lambda v, t: v @ a.T * t[:, None], x, torch.full((50,), 2.0, dtype=torch.float64))
    assert torch.allclose(norms, torch.full((50,), 2 * float(torch.linalg.matrix_norm(a, ord=2)), dtype=torch.float64))
    fd = finite_difference_opnorm(lambda v, t: v @ a.T * t[:, None], x, torch.full((50,), 2.0, dtype=torch.float64))
    assert torch.allclose(fd, norms, rtol=1e-9)
    e = score_mse(x + 0.1, x)
    assert e["mse"] == pytest.approx(0.03) and score_mse(x * float("nan"), x)["mse"] == float("inf")
    with pytest.raises(ValueError, match="d <= 3"):
        histogram_tv(torch.zeros(5, 4), GaussianMixture.random(2, 4))
    # binned KL: near 0 for exact draws (plug-in bias only), large for a shifted sampler
    exact = GMM_1D.sample(N, generator=torch.Generator().manual_seed(5))
    assert histogram_kl(exact, GMM_1D) < 0.01 < histogram_kl(exact + 0.5, GMM_1D)
    # outside-the-grid and non-finite samples count against the sampler
    assert histogram_tv(torch.full((100, 1), 1e6, dtype=torch.float64), GMM_1D) > 0.99
    assert histogram_tv(torch.full((100, 1), float("nan"), dtype=torch.float64), GMM_1D) > 0.99
