"""verify_diffusion: certify a (compressed) score network against the exact Gaussian-mixture diffusion.

For the dense network and for each target's ONNX model (its precision, ONNX Runtime): ε_score² against the closed-form
score, the TV certificate of the DDPM sampler on the configured grid (:func:`pipeline.diffusion.bounds.tv_certificate`),
and the TV of real samples against the exact mixture (histogram, d ≤ 3). Plus the network's empirical Lipschitz
constant against the k-independent bound. A gate on measured TV and/or the certificate records failures (the run
exits 1 after writing the report). Source: arXiv 2405.16418.

Metrics (the contract checks read from report.json)::

    score_mse:      {dense, per_target: {name: ε²}, torch, relative: {...}, points}
    lipschitz:      {empirical, bound, dense, exact, per_target: {name: finite-difference estimate}, points}
    tv_certificate: {dense, per_target: {name: bound}, terms: {...}, steps, spacing, sampler: "ddpm", constants}
    tv_measured:    {dense, per_target: {name: TV}, kl: {dense, per_target}, floor, exact_score, samples, sampler, steps}
    gate:           {ok, max_tv_measured, max_tv_certificate, failed: [...]}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.artifact import Artifact, hash_file
from pipeline.diffusion.network import FAMILY
from pipeline.errors import ConfigError, StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import load_dense, load_from_artifact

__all__ = ["VerifyDiffusionConfig", "run_verify_diffusion"]


class VerifyDiffusionConfig(StageConfig):
    kind = "verify_diffusion"
    mixture: dict[str, Any] | None = Field(
        None,
        description="exact p_0 {weights, means, covs | stds}; omitted = the data_distribution in the model's config.json",
    )
    sampler: Literal["ddpm", "probability_flow"] = Field(
        "ddpm",
        description="sampler for measured TV: DDPM exponential integrator, or probability-flow ODE + Langevin corrector",
    )
    steps: int = Field(200, ge=1, le=100_000, description="denoising steps")
    spacing: Literal["exponential", "uniform"] = Field(
        "exponential", description="time grid: geometric in OU time (small steps near δ) or uniform"
    )
    T: float | None = Field(None, gt=0, description="start time; omitted = the network's t_max")
    delta: float | None = Field(None, gt=0, description="early-stopping time δ; omitted = the network's t_min")
    corrector_steps: int = Field(
        1, ge=0, le=100, description="probability_flow: Langevin corrector iterations per step"
    )
    corrector_step: float = Field(0.05, gt=0, le=1, description="probability_flow: Langevin step as a fraction of b_t²")
    samples: int = Field(20_000, ge=100, le=2_000_000, description="samples per network for measured TV")
    score_points: int = Field(20_000, ge=100, le=2_000_000, description="(x, t) points for ε_score")
    lipschitz_points: int = Field(
        512, ge=8, le=100_000, description="(x, t) points for the empirical Lipschitz constant"
    )
    max_tv_measured: float | None = Field(
        0.15, gt=0, le=1, description="gate: measured TV of every target (and dense) at most this (null = report only)"
    )
    max_tv_certificate: float | None = Field(
        None,
        gt=0,
        description="gate: certificate of every target at most this (null = report only; constants set to 1, see docs)",
    )


def _mixture(cfg: VerifyDiffusionConfig, loaded: Any):
    from pipeline.diffusion.gmm import GaussianMixture
    from pipeline.diffusion.network import ScoreModelError, mixture_of

    gmm: GaussianMixture | None
    if cfg.mixture is not None:
        try:
            gmm = GaussianMixture.from_dict(cfg.mixture)
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ConfigError(f"stages.verify_diffusion.mixture: {type(exc).__name__}: {exc}") from None
    else:
        try:
            gmm = mixture_of(loaded.model.config)
        except ScoreModelError as exc:
            raise StageError("verify_diffusion", f"model config.json: {exc}") from None
        if gmm is None:
            raise StageError(
                "verify_diffusion",
                "no mixture: give 'mixture' in the stage config or record data_distribution in the model's config.json",
            )
    if gmm.d != loaded.model.config.dim:
        raise StageError(
            "verify_diffusion", f"mixture has dimension {gmm.d} but the network has dim {loaded.model.config.dim}"
        )
    return gmm


@register_stage(VerifyDiffusionConfig, version=1)
def run_verify_diffusion(art: Artifact, cfg: VerifyDiffusionConfig, ctx: StageContext) -> Artifact:
    """Score error, Lipschitz vs bound, TV certificate and measured TV for dense and per-target networks; gate."""
    import torch

    from pipeline.diffusion.bounds import lipschitz_bound, tv_certificate
    from pipeline.diffusion.evaluate import onnx_scorer, torch_scorer
    from pipeline.diffusion.metrics import (
        MAX_HISTOGRAM_DIM,
        finite_difference_opnorm,
        histogram_kl,
        histogram_tv,
        histogram_tv_floor,
        jacobian_opnorm,
        score_error_points,
        score_mse,
    )
    from pipeline.diffusion.samplers import ddpm_sample, probability_flow_sample, time_grid
    from runtimes.session import make_session

    if art.family != FAMILY:
        raise StageError(
            "verify_diffusion", f"needs a score network (model family 'score-model'), got family '{art.family}'"
        )
    loaded = load_from_artifact(art, ctx)
    dense = load_dense(art)
    gmm = _mixture(cfg, loaded)
    conf = loaded.model.config
    sch = conf.schedule
    T = cfg.T or conf.t_max
    delta = cfg.delta or conf.t_min
    if not delta < T:
        raise ConfigError(f"stages.verify_diffusion: need delta < T (got delta={delta}, T={T})")
    if T > conf.t_max or delta < conf.t_min:
        ctx.log.warning(
            "sampling on [%g, %g] but the network was trained on [%g, %g]: it extrapolates",
            delta,
            T,
            conf.t_min,
            conf.t_max,
        )
    grid = time_grid(cfg.steps, T=T, delta=delta, schedule=sch, spacing=cfg.spacing)
    seed = ctx.run.seed

    scorers: dict[str, Any] = {"dense": torch_scorer(dense.model)}
    same_as: dict[str, str] = {}  # target -> earlier target with a byte-identical model (measured once)
    by_hash: dict[str, str] = {}
    for name, prof in ctx.targets.items():
        if name not in art.targets:
            continue
        path = ctx.resolve(art.targets[name].model)
        digest = hash_file(path)
        if digest in by_hash:
            same_as[name] = by_hash[digest]
            continue
        by_hash[digest] = name
        scorers[name] = onnx_scorer(make_session(path, threads=min(prof.threads or 2, 2)))
    targets = [n for n in ctx.targets if n in art.targets]

    # ε_score² on one shared set of (t, x ~ p_t) points
    x, t, exact = score_error_points(
        gmm, cfg.score_points, T=T, delta=delta, schedule=sch, generator=torch.Generator().manual_seed(seed * 1000 + 11)
    )
    err = {n: score_mse(fn(x, t), exact) for n, fn in scorers.items()}
    err.update({n: err[m] for n, m in same_as.items()})
    err_torch = score_mse(torch_scorer(loaded.model)(x, t), exact)
    score: dict[str, Any] = {
        "dense": err["dense"]["mse"],
        "per_target": {n: err[n]["mse"] for n in targets},
        "torch": err_torch["mse"],
        "relative": {
            "dense": err["dense"]["relative"],
            "per_target": {n: err[n]["relative"] for n in targets},
            "torch": err_torch["relative"],
        },
        "points": cfg.score_points,
    }

    # Lipschitz: times on the sampler grid, x ~ p_t; the network's Jacobian norm vs the bound and the exact Hessian
    g = torch.Generator().manual_seed(seed * 1000 + 12)
    tl = grid[torch.randint(len(grid), (cfg.lipschitz_points,), generator=g)]
    xl = gmm.sample_t(tl, generator=g, schedule=sch)
    lip_net = jacobian_opnorm(lambda a, b: loaded.model(a.float(), b.float()), xl, tl)
    lip_dense = jacobian_opnorm(lambda a, b: dense.model(a.float(), b.float()), xl, tl)
    lip_exact = torch.linalg.matrix_norm(gmm.hessian(xl, tl, sch), ord=2)
    bound_t = lipschitz_bound(gmm, tl, sch)
    lip_fd = {n: float(finite_difference_opnorm(scorers[n], xl, tl).max()) for n in scorers if n != "dense"}
    lipschitz = {
        "empirical": float(lip_net.max()),
        "bound": float(bound_t.max()),
        "dense": float(lip_dense.max()),
        "exact": float(lip_exact.max()),
        "per_target": {n: lip_fd[same_as.get(n, n)] for n in targets},
        "per_target_method": "central differences, h = 0.01",
        "empirical_over_bound_max": float((lip_net / bound_t).max()),
        "exact_over_bound_max": float((lip_exact / bound_t).max()),
        "points": cfg.lipschitz_points,
        "bound_holds_globally": gmm.shared_covariance(),
    }

    # the certificate per network (DDPM on this grid, its own ε²)
    certs = {n: tv_certificate(gmm, sch, grid, err[n]["mse"]) for n in ["dense", *targets]}
    cert = {
        "dense": certs["dense"]["total"],
        "per_target": {n: certs[n]["total"] for n in targets},
        "terms": {"dense": certs["dense"], "per_target": {n: certs[n] for n in targets}},
        "steps": cfg.steps,
        "spacing": cfg.spacing,
        "T": T,
        "delta": delta,
        "sampler": "ddpm",
        "constants": "set to 1 ([I])",
    }

    # measured TV of real samples
    measured: dict[str, Any] = {"samples": cfg.samples, "sampler": cfg.sampler, "steps": cfg.steps}
    if same_as:
        measured["same_model_as"] = same_as
    if gmm.d > MAX_HISTOGRAM_DIM:
        measured.update(
            {
                "dense": None,
                "per_target": {n: None for n in targets},
                "kl": None,
                "note": f"histogram TV needs d <= {MAX_HISTOGRAM_DIM} (d = {gmm.d})",
            }
        )
    else:

        def draw(fn) -> Any:
            gen = torch.Generator().manual_seed(
                seed * 1000 + 13
            )  # the same noise for every network: differences are the score's
            if cfg.sampler == "ddpm":
                return ddpm_sample(fn, cfg.samples, gmm.d, grid, schedule=sch, generator=gen)
            return probability_flow_sample(
                fn,
                cfg.samples,
                gmm.d,
                grid,
                schedule=sch,
                generator=gen,
                corrector_steps=cfg.corrector_steps,
                corrector_step=cfg.corrector_step,
            )

        drawn = {n: draw(fn) for n, fn in scorers.items()}
        tv = {n: histogram_tv(y, gmm) for n, y in drawn.items()}
        kl = {n: histogram_kl(y, gmm) for n, y in drawn.items()}
        for n, m in same_as.items():
            tv[n], kl[n] = tv[m], kl[m]
        measured.update(
            {
                "dense": tv["dense"],
                "per_target": {n: tv[n] for n in targets},
                "kl": {"dense": kl["dense"], "per_target": {n: kl[n] for n in targets}},
                "exact_score": histogram_tv(draw(lambda a, b: gmm.score(a, b, sch)), gmm),
                "floor": histogram_tv_floor(
                    gmm, cfg.samples, generator=torch.Generator().manual_seed(seed * 1000 + 14)
                ),
            }
        )

    failures: list[dict[str, Any]] = []
    for n in ["dense", *targets]:
        m = measured["dense"] if n == "dense" else measured["per_target"][n]
        if cfg.max_tv_measured is not None and m is not None and not m <= cfg.max_tv_measured:
            failures.append({"target": n, "check": "tv_measured", "value": round(m, 4), "limit": cfg.max_tv_measured})
        c = certs[n]["total"]
        if cfg.max_tv_certificate is not None and not c <= cfg.max_tv_certificate:
            failures.append(
                {"target": n, "check": "tv_certificate", "value": round(c, 4), "limit": cfg.max_tv_certificate}
            )
    for f in failures:
        eps = score["dense"] if f["target"] == "dense" else score["per_target"][f["target"]]
        f["value"] = f"{f['value']} (ε_score² {eps:.4g})"
    gate = {
        "ok": not failures,
        "max_tv_measured": cfg.max_tv_measured,
        "max_tv_certificate": cfg.max_tv_certificate,
        "failed": [f"{f['target']}: {f['check']}" for f in failures],
    }
    ctx.metrics.update(
        {
            "score_mse": score,
            "lipschitz": lipschitz,
            "tv_certificate": cert,
            "tv_measured": measured,
            "gate": gate,
            "failures": failures,
        }
    )
    for n in ["dense", *targets]:
        ctx.log.info(
            "%s: ε_score² %.4g, certificate %.3g, measured TV %s",
            n,
            err[n]["mse"],
            certs[n]["total"],
            "–"
            if measured.get("dense") is None
            else f"{(measured['dense'] if n == 'dense' else measured['per_target'][n]):.4f}",
        )
    return art
