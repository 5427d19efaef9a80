"""Diffusion over Gaussian mixtures: exact marginals, k-independent smoothness bounds, samplers, a certificate.

Source: "Unraveling the Smoothness Properties of Diffusion Models: A Gaussian Mixture Perspective"
(arXiv 2405.16418).

* :mod:`~pipeline.diffusion.gmm`: :class:`GaussianMixture` (p_t, score, Hessian in closed form), :class:`Schedule`.
* :mod:`~pipeline.diffusion.bounds`: Lipschitz / second-moment / KL bounds and :func:`tv_certificate`.
* :mod:`~pipeline.diffusion.samplers`: DDPM (exponential integrator), probability-flow ODE + Langevin corrector.
* :mod:`~pipeline.diffusion.metrics`: score MSE, empirical Lipschitz, histogram TV.
* :mod:`~pipeline.diffusion.network` / :mod:`~pipeline.diffusion.train`: the score network, its folder format and
  its denoising-score-matching trainer; :mod:`~pipeline.diffusion.kind` registers it as model kind
  ``edgepipe-score-mlp`` (task ``score-model``).
"""

from pipeline.diffusion.bounds import (
    early_stop_tv_bound,
    kl_to_standard_normal_bound,
    lipschitz_bound,
    second_moment,
    tv_certificate,
)
from pipeline.diffusion.gmm import GaussianMixture, Schedule
from pipeline.diffusion.metrics import (
    histogram_kl,
    histogram_tv,
    histogram_tv_floor,
    jacobian_opnorm,
    score_error_points,
    score_mse,
)
from pipeline.diffusion.samplers import ddpm_sample, probability_flow_sample, time_grid

__all__ = [
    "GaussianMixture",
    "Schedule",
    "ddpm_sample",
    "early_stop_tv_bound",
    "histogram_kl",
    "histogram_tv",
    "histogram_tv_floor",
    "jacobian_opnorm",
    "kl_to_standard_normal_bound",
    "lipschitz_bound",
    "probability_flow_sample",
    "score_error_points",
    "score_mse",
    "second_moment",
    "time_grid",
    "tv_certificate",
]
