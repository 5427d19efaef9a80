"""Denoising score matching for :class:`~pipeline.diffusion.network.ScoreMLP` on a Gaussian mixture (CPU, seeded).

Loss: E_s E_{x_0, z} ‖ε̂(a_t x_0 + b_t z, t) − z‖² (the ε-form of DSM, Vincent 2011 / Ho et al. 2020): its minimiser
is ε* = −b_t ∇log p_t, so ŝ = −ε̂ / b_t estimates the score. OU time s is drawn half uniformly on [s(δ), s(T)]
(the measure :func:`~pipeline.diffusion.metrics.score_mse` averages over) and half log-uniformly (small t). Fresh
samples every step (the mixture is known), Adam with cosine decay, fixed seed: the same recipe gives the same network
on the same torch build.

CLI (writes a model folder edgepipe loads with ``model.path``)::

    python -m pipeline.diffusion.train OUT_DIR [--mixture mixture.json] [--steps 8000] [--hidden 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.diffusion.bounds import second_moment
from pipeline.diffusion.gmm import GaussianMixture, Schedule
from pipeline.diffusion.network import ScoreMLP, ScoreModelConfig, save_score_model

__all__ = ["TrainRecipe", "example_mixture", "main", "train_score_model"]


@dataclass(frozen=True)
class TrainRecipe:
    """Training hyper-parameters (recorded in the model's config.json under ``training``)."""

    steps: int = 8000
    batch: int = 1024
    lr: float = 2e-3
    hidden: int = 64
    layers: int = 3
    time_features: int = 16
    t_min: float = 1e-3
    t_max: float = 8.0
    seed: int = 0


def example_mixture() -> GaussianMixture:
    """The example data distribution: 6 components on a ring of radius 2 in 2-D, shared isotropic std 0.45, unequal
    weights — multi-modal with a k-independent Lipschitz bound that holds globally (shared covariance)."""
    k = 6
    ang = torch.arange(k, dtype=torch.float64) * (2 * torch.pi / k)
    means = 2.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    w = torch.tensor([3, 1, 2, 1, 3, 2], dtype=torch.float64)
    return GaussianMixture(w / w.sum(), means, (0.45**2) * torch.eye(2, dtype=torch.float64).expand(k, 2, 2).clone())


def train_score_model(
    gmm: GaussianMixture, recipe: TrainRecipe = TrainRecipe(), *, schedule: Schedule = Schedule(), log_every: int = 0
) -> ScoreMLP:
    """Train a :class:`ScoreMLP` on ``gmm`` by denoising score matching; deterministic for a given seed and build.

    Returns:
        The trained network (eval mode, float32), its config recording the mixture and the recipe.
    """
    g = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    cfg = ScoreModelConfig(
        dim=gmm.d,
        hidden=recipe.hidden,
        layers=recipe.layers,
        time_features=recipe.time_features,
        schedule=schedule,
        t_min=recipe.t_min,
        t_max=recipe.t_max,
        data_second_moment=float(second_moment(gmm)) / gmm.d,
        extra={"data_distribution": {"type": "gaussian-mixture", **gmm.to_dict()}, "training": asdict(recipe)},
    )
    model = ScoreMLP(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.steps, eta_min=recipe.lr * 0.02)
    s_lo = float(schedule.s(torch.tensor(recipe.t_min, dtype=torch.float64)))
    s_hi = float(schedule.s(torch.tensor(recipe.t_max, dtype=torch.float64)))
    model.train()
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        # half uniform in OU time (the measure ε_score averages over), half log-uniform (the small-t end, where
        # the score is least smooth and a uniform draw almost never lands)
        u = torch.rand(recipe.batch, dtype=torch.float64, generator=g)
        s = torch.where(torch.arange(recipe.batch) % 2 == 0, s_lo + (s_hi - s_lo) * u, s_lo * (s_hi / s_lo) ** u)
        t = schedule.t_of_s(s)
        x0 = gmm.sample(recipe.batch, generator=g)
        z = torch.randn(x0.shape, dtype=torch.float64, generator=g)
        xt = schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * z
        loss = ((model.eps(xt.float(), t.float()) - z.float()) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{recipe.steps}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f}s", flush=True
            )
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.diffusion.train", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="model folder to write (config.json + model.safetensors)")
    p.add_argument("--mixture", help="JSON file {weights, means, covs|stds}; default: the 6-component 2-D ring example")
    for f in ("steps", "batch", "hidden", "layers", "seed"):
        p.add_argument(f"--{f}", type=int, default=getattr(TrainRecipe, f))
    for f in ("lr", "t_min", "t_max"):
        p.add_argument(f"--{f.replace('_', '-')}", dest=f, type=float, default=getattr(TrainRecipe, f))
    p.add_argument("--schedule", choices=["ou", "vp-linear"], default="ou")
    a = p.parse_args(argv)
    try:
        gmm = GaussianMixture.from_dict(json.loads(Path(a.mixture).read_text())) if a.mixture else example_mixture()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        p.error(f"--mixture {a.mixture}: {type(exc).__name__}: {exc}")
    recipe = TrainRecipe(
        steps=a.steps,
        batch=a.batch,
        lr=a.lr,
        hidden=a.hidden,
        layers=a.layers,
        t_min=a.t_min,
        t_max=a.t_max,
        seed=a.seed,
    )
    model = train_score_model(gmm, recipe, schedule=Schedule(a.schedule), log_every=max(1, a.steps // 10))
    print(f"wrote {save_score_model(model, Path(a.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
