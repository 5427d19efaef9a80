"""prune / export / quantize / validate for score networks (model family ``score-model``, :mod:`pipeline.diffusion`).

Same YAML and config classes as the text stages; the runner picks these for artifacts of family ``score-model``
(``register_stage(..., family=...)``). Inputs are (x, t) pairs drawn from the diffused data distribution p_t
(the mixture recorded in the model's config.json, else a Gaussian of the recorded second moment); fidelity is the
score error against the closed-form ∇log p_t (or against the dense network when no mixture is recorded).
Stages that only make sense for transformers (attention, recover) refuse with one line.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

from pipeline.artifact import Artifact, TargetModel
from pipeline.diffusion.network import FAMILY  # the score-network family, said once
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import load_dense, load_from_artifact, write_target_bundle
from pipeline.stages.attention import AttentionConfig
from pipeline.stages.benchmark import BenchmarkConfig, time_target
from pipeline.stages.export import DEFAULT_OPSET, ExportConfig
from pipeline.stages.prune import PatternGivesNoSpeedup, PruneConfig
from pipeline.stages.quantize import QuantizeConfig, quantize_targets
from pipeline.stages.recover import RecoverConfig
from pipeline.stages.validate import ValidateConfig

__all__ = ["FAMILY", "model_inputs"]

_SEEDS = {"calibration": 1, "heldout": 2}  # disjoint draws of (x, t), offset by the run seed


def model_inputs(loaded: Any, ctx: StageContext, split: str, n: int):
    """(x, t) float64 for ``split`` ("calibration" / "heldout"): x ~ p_t of the recorded mixture, t uniform in OU time."""
    from pipeline.diffusion.evaluate import score_inputs
    from pipeline.diffusion.network import mixture_of

    return score_inputs(
        loaded.model, n, seed=ctx.run.seed * 1000 + _SEEDS[split], mixture=mixture_of(loaded.model.config)
    )


def _n_samples(ctx: StageContext, split: str) -> int:
    """Points per split: 64 per calibration passage / held-out passage of the run's calibration settings."""
    c = ctx.run.calibration
    return 64 * (c.samples if split == "calibration" else c.heldout)


@register_stage(PruneConfig, version=1, family=FAMILY)
def prune_score_model(art: Artifact, cfg: PruneConfig, ctx: StageContext) -> Artifact:
    """Prune every linear layer of the score network (a method of score_prune_methods(); unstructured or N:M)."""
    from pipeline.diffusion.evaluate import prune_linears_, score_prune_methods, torch_scorer
    from pipeline.diffusion.metrics import score_mse
    from pipeline.diffusion.network import mixture_of
    from pipeline.models import save_model

    methods = score_prune_methods()
    if cfg.method not in methods or cfg.pattern == "structured":
        raise StageError(
            "prune",
            f"score networks support method {'/'.join(methods)} with pattern unstructured or n:m (got {cfg.method}/{cfg.pattern})",
        )
    slow = [n for n, p in ctx.targets.items() if cfg.pattern not in p.fast_patterns]
    if slow:
        msg = f"pattern '{cfg.pattern}' gives no speedup on target(s) {slow}"
        if cfg.strict:
            raise StageError("prune", msg + "; set strict: false to prune anyway")
        warnings.warn(msg, PatternGivesNoSpeedup, stacklevel=1)
        ctx.log.warning(msg)
    loaded = load_from_artifact(art, ctx)
    calib = model_inputs(loaded, ctx, "calibration", min(cfg.calibration_samples * 64, _n_samples(ctx, "calibration")))
    x, t = model_inputs(loaded, ctx, "heldout", _n_samples(ctx, "heldout"))
    mix = mixture_of(loaded.model.config)
    ref = mix.score(x, t, loaded.model.config.schedule) if mix is not None else torch_scorer(loaded.model)(x, t)
    before = score_mse(torch_scorer(loaded.model)(x, t), ref)
    n, m = (cfg.n, cfg.m) if cfg.pattern == "n:m" else (0, 0)
    try:
        metrics = prune_linears_(loaded.model, method=cfg.method, sparsity=cfg.sparsity, n=n, m=m, calibration=calib)
    except ValueError as exc:
        raise StageError("prune", str(exc)) from None
    after = score_mse(torch_scorer(loaded.model)(x, t), ref)
    out_dir = ctx.subdir("model")
    save_model(loaded, out_dir)
    ctx.metrics.update(
        {
            **metrics,
            "method": cfg.method,
            "pattern": cfg.pattern,
            "score_mse": {
                "before": before,
                "after": after,
                "reference": "closed form" if mix is not None else "dense network",
            },
            **({"warning": msg} if slow else {}),
        }
    )
    changes = {
        **dict(art.torch_changes),
        "prune": {"method": cfg.method, "pattern": cfg.pattern, "sparsity": cfg.sparsity},
    }
    return art.replace(model_dir=ctx.ref(out_dir), torch_changes=changes)


@register_stage(ExportConfig, version=1, family=FAMILY)
def export_score_model(art: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
    """Export the score network to ONNX (inputs x, t; output score) once per opset and check it against PyTorch."""
    from pipeline.diffusion.evaluate import feeds_of, torch_scorer
    from pipeline.diffusion.network import export_score_onnx
    from runtimes.session import make_session

    if cfg.exporter != "dynamo" or cfg.with_past or cfg.cross_check:
        raise StageError("export", "score networks export with exporter 'dynamo' only (no with_past, no cross_check)")
    loaded = load_from_artifact(art, ctx)
    by_opset: dict[int, list[str]] = {}
    for name, prof in ctx.targets.items():
        opset = cfg.opset or min(prof.opset, DEFAULT_OPSET)
        if opset > prof.opset:
            raise StageError("export", f"opset {opset} is newer than target '{name}' runs (opset ≤ {prof.opset})")
        by_opset.setdefault(opset, []).append(name)
    x, t = model_inputs(loaded, ctx, "calibration", 256)
    ref = torch_scorer(loaded.model)(x, t).numpy()
    io = {"input_names": ["x", "t"], "output_names": ["score"], "dim": loaded.model.config.dim}
    exports: dict[str, Any] = {}
    out = art
    for opset, names in sorted(by_opset.items()):
        try:
            path = export_score_onnx(loaded.model, ctx.subdir(f"opset{opset}") / "model.onnx", opset=opset)
        except Exception as exc:
            raise StageError(
                "export",
                f"ONNX export failed at opset {opset}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            ) from exc
        (got,) = make_session(path).run(["score"], feeds_of(x, t))
        exports[f"opset{opset}"] = {
            "exporter": "dynamo",
            "size_bytes": path.stat().st_size,
            "targets": names,
            "max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
        }
        for name in names:
            out = out.with_target(name, TargetModel(model=ctx.ref(path), precision="fp32", io={**io, "opset": opset}))
    ctx.metrics.update({"exports": exports})
    return out


@register_stage(QuantizeConfig, version=1, family=FAMILY)
def quantize_score_model(art: Artifact, cfg: QuantizeConfig, ctx: StageContext) -> Artifact:
    """Per-target precision for the score network; int8-static calibrates on (x, t) drawn from p_t."""
    from pipeline.diffusion.evaluate import feeds_of

    def calibration_feeds(tm: TargetModel) -> list[dict]:
        loaded = load_from_artifact(art, ctx)
        x, t = model_inputs(loaded, ctx, "calibration", 64 * cfg.calibration_samples)
        return [feeds_of(xb, tb) for xb, tb in zip(x.split(64), t.split(64))]

    return quantize_targets(art, cfg, ctx, calibration_feeds)


@register_stage(ValidateConfig, version=1, family=FAMILY)
def validate_score_model(art: Artifact, cfg: ValidateConfig, ctx: StageContext) -> Artifact:
    """Per target: onnx checker, parity vs the current PyTorch network (profile tolerance, gated), fidelity =
    score error against the closed form (reported; ``verify_diffusion`` gates on it), on-device bundle."""
    import onnx

    from pipeline.diffusion.evaluate import feeds_of, onnx_scorer, torch_scorer
    from pipeline.diffusion.metrics import score_mse
    from pipeline.diffusion.network import mixture_of
    from runtimes.compare import compare, comparison_table
    from runtimes.session import make_session

    if not art.targets:
        raise StageError("validate", "no ONNX model yet: put an 'export' stage before 'validate'")
    loaded = load_from_artifact(art, ctx)
    dense = load_dense(art)
    n = 64 * (cfg.samples or ctx.run.calibration.heldout)
    x, t = model_inputs(loaded, ctx, "heldout", n)
    mix = mixture_of(loaded.model.config)
    exact = mix.score(x, t, loaded.model.config.schedule) if mix is not None else torch_scorer(dense.model)(x, t)
    current = torch_scorer(loaded.model)(x, t)
    feeds = feeds_of(x, t)
    failures: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    out = art
    for name, prof in ctx.targets.items():
        tm = art.targets[name]
        path = ctx.resolve(tm.model)
        onnx.checker.check_model(str(path), full_check=True)
        tol = prof.tolerances[tm.precision]
        sess = make_session(path, threads=min(prof.threads or 2, 2))
        got = onnx_scorer(sess)(x, t)
        # one row of all n·d values: the cosine of a single 2-vector near a mode (score ≈ 0) is noise, not parity
        rows = compare(
            {"score": current.numpy().reshape(1, -1)},
            {"score": got.numpy().reshape(1, -1)},
            atol=tol.atol,
            min_cosine=tol.min_cosine,
        )
        parity = {
            "max_abs_diff": float(rows[0].max_abs_diff),
            "cosine_min": float(rows[0].cosine_min),
            "atol": tol.atol,
            "min_cosine": tol.min_cosine,
            "ok": bool(rows[0].ok),
        }
        if not parity["ok"]:
            failures.append(
                {
                    "target": name,
                    "check": "parity",
                    "value": f"max_abs_diff {parity['max_abs_diff']:.3g}, cos_min {parity['cosine_min']:.4f}",
                    "limit": f"atol {tol.atol}, min_cosine {tol.min_cosine}",
                }
            )
        err = score_mse(got, exact)
        fid = {
            "score_mse": err["mse"],
            "score_rel_mse": err["relative"],
            "reference": "closed form" if mix is not None else "dense network",
            "points": n,
        }
        files = dict(tm.files)
        if cfg.bundle:
            bundle = write_target_bundle(
                ctx,
                ctx.subdir(name, "bundle"),
                prof,
                tm,
                {k: v[:64] for k, v in feeds.items()},
                {"score": current.numpy()[:64].astype(np.float32)},
                threads=prof.threads or 1,
            )
            files["bundle"] = ctx.ref(bundle)
        summary[name] = {"precision": tm.precision, "parity": parity, "fidelity": fid, "table": comparison_table(rows)}
        out = out.with_target(
            name, dataclasses.replace(tm, files=files, metrics={**dict(tm.metrics), "parity": parity, "fidelity": fid})
        )
    ctx.metrics.update({"targets": summary, "failures": failures, "points": n})
    return out


@register_stage(BenchmarkConfig, version=1, family=FAMILY)
def benchmark_score_model(art: Artifact, cfg: BenchmarkConfig, ctx: StageContext) -> Artifact:
    """Latency of one score evaluation (= one denoising step) for ``batch`` points, per target, in a fresh process."""
    from pipeline.diffusion.evaluate import feeds_of, torch_scorer

    if not art.targets:
        raise StageError("benchmark", "no ONNX model yet: put an 'export' stage before 'benchmark'")
    loaded = load_from_artifact(art, ctx)
    x, t = model_inputs(loaded, ctx, "heldout", cfg.batch)
    feeds, ref = feeds_of(x, t), {"score": torch_scorer(loaded.model)(x, t).numpy().astype(np.float32)}
    summary: dict[str, Any] = {}
    out = art
    for name in ctx.targets:
        tm = art.targets[name]
        entry = time_target(ctx, name, tm, feeds, ref, cfg)
        summary[name] = entry
        metrics = {
            **dict(tm.metrics),
            "latency_ms": entry["latency_ms"],
            "peak_rss_mb": entry["peak_rss_mb"],
            "benchmark": entry,
        }
        out = out.with_target(name, dataclasses.replace(tm, metrics=metrics))
    ctx.metrics.update({"targets": summary})
    return out


def _not_for_score_models(kind: str):
    def refuse(art: Artifact, cfg: StageConfig, ctx: StageContext) -> Artifact:
        raise StageError(
            kind, "does not apply to score networks (model family 'score-model'); remove it from the pipeline"
        )

    refuse.__doc__ = f"{kind}: not applicable to score networks."
    return refuse


for _cfg in (AttentionConfig, RecoverConfig):
    register_stage(_cfg, family=FAMILY)(_not_for_score_models(_cfg.kind))
