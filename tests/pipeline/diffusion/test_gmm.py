"""Closed-form p_t, score and Hessian of a diffused Gaussian mixture against autograd and Monte Carlo."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.gmm import GaussianMixture, Schedule

SCHEDULES = [Schedule("ou"), Schedule("vp-linear", 0.1, 20.0)]


def _autograd(
    gmm: GaussianMixture, x: torch.Tensor, t: torch.Tensor, sch: Schedule
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, t, sch).sum(), x, create_graph=True)
    hess = torch.stack([torch.autograd.grad(grad[:, j].sum(), x, retain_graph=True)[0] for j in range(x.shape[1])], 1)
    return grad.detach(), hess.detach()


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("k,d,shared", [(1, 1, False), (5, 3, False), (7, 2, True), (64, 8, False)])
def test_score_and_hessian_match_autograd(k, d, shared, sch):
    g = torch.Generator().manual_seed(k * 100 + d)
    gmm = GaussianMixture.random(k, d, generator=g, shared=shared)
    x = 3 * torch.randn(33, d, dtype=torch.float64, generator=g)
    t = 0.002 + 0.9 * torch.rand(33, dtype=torch.float64, generator=g)
    grad, hess = _autograd(gmm, x, t, sch)
    scale = grad.abs().max()
    assert (gmm.score(x, t, sch) - grad).abs().max() <= 1e-10 * max(1.0, float(scale))
    assert (gmm.hessian(x, t, sch) - hess).abs().max() <= 1e-9 * max(1.0, float(hess.abs().max()))


def test_log_sum_exp_is_stable_far_from_every_component():
    gmm = GaussianMixture.from_dict({"means": [[-1.0, 0.0], [1.0, 0.0]], "stds": [0.01, 0.02]})
    x = torch.tensor([[500.0, -300.0], [0.0, 1e3]], dtype=torch.float64)
    for t in (0.0, 1e-4):
        s = gmm.score(x, t)
        assert torch.isfinite(s).all() and torch.isfinite(gmm.hessian(x, t)).all()
        assert torch.isfinite(gmm.log_prob(x, t)).all()
    # far out on the right only the wider component matters: the score is its own
    s = gmm.score(torch.tensor([[50.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(s, torch.tensor([[-(50.0 - 1.0) / 0.02**2, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: s.kind)
def test_marginal_matches_forward_process_samples(sch):
    g = torch.Generator().manual_seed(3)
    gmm = GaussianMixture.random(3, 2, generator=g)
    t = torch.full((200_000,), 0.3, dtype=torch.float64)
    xt = gmm.sample_t(t, generator=g, schedule=sch)
    pt = gmm.marginal(0.3, sch)
    mean = (pt.weights[:, None] * pt.means).sum(0)
    second = (pt.weights[:, None, None] * (pt.covs + pt.means[:, :, None] * pt.means[:, None, :])).sum(0)
    assert torch.allclose(xt.mean(0), mean, atol=0.02)
    assert torch.allclose(xt.T @ xt / len(xt), second, atol=0.05)
    # the time-t mixture and the (x, t) evaluation agree
    x = torch.randn(9, 2, dtype=torch.float64, generator=g)
    assert torch.allclose(pt.log_prob(x), gmm.log_prob(x, 0.3, sch), atol=1e-12)


def test_schedule_inverse_and_invalid_inputs():
    for sch in SCHEDULES:
        t = torch.linspace(0.001, 1.0, 17, dtype=torch.float64)
        assert torch.allclose(sch.t_of_s(sch.s(t)), t, atol=1e-12)
        assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 1), torch.ones(2, 1, 1))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="finite"):
        GaussianMixture(torch.tensor([1.0]), torch.tensor([[float("nan")]]), torch.ones(1, 1, 1))
    with pytest.raises(ValueError, match="schedule kind"):
        Schedule("cosine")  # type: ignore[arg-type]
