"""quantize: per target, convert the fp32 ONNX model to the target's precision and package it
(ORT format + required-operators config + mobile usability report where the profile asks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from pipeline.artifact import Artifact, TargetModel
from pipeline.errors import StageError
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import (
    encode,
    load_from_artifact,
    progress_bar,
    text_sets,
    to_numpy_feeds,
    warn_without_validate,
)

__all__ = ["QuantizeConfig", "check_ops_for_target", "quantize_targets", "run_quantize"]

Precision = Literal["fp32", "fp16", "int8", "int8-static"]


class QuantizeConfig(StageConfig):
    kind = "quantize"
    precision: Precision | None = Field(
        None, description="one precision for every target; omitted = each profile's default"
    )
    per_target: dict[str, Precision] = Field(default_factory=dict, description="precision overrides by target name")
    per_channel: bool = Field(
        True, description="int8: per-channel weight scales (much better fidelity than per-tensor)"
    )
    calibration_samples: int = Field(32, ge=1, description="int8-static: calibration passages")
    quantize_embeddings: bool = Field(
        True, description="int8: also quantize embedding tables (Gather): ~2.5x smaller MiniLM at the same fidelity"
    )
    keep_fp32_ops: list[str] | None = Field(
        None, description="op types kept in fp32 (default: LayerNorm, Softmax and residual-sensitive ops)"
    )

    def precision_for(self, name: str, prof) -> str:
        return self.per_target.get(name) or self.precision or prof.default_precision

    def target_problem(self, targets) -> str | None:
        """What makes this config unusable for ``targets`` (name -> profile), or None."""
        unknown = sorted(set(self.per_target) - set(targets))
        if unknown:
            return f"per_target names target(s) not in this run: {', '.join(repr(u[:64]) for u in unknown[:5])} (targets: {', '.join(targets)})"
        for name, prof in targets.items():
            precision = self.precision_for(name, prof)
            if precision not in prof.precisions:
                return f"precision '{precision}' is not supported by target '{name}' (supports {prof.precisions})"
        return None

    def check(self, plan: RunPlan) -> None:
        problem = self.target_problem(plan.targets)
        if problem:
            raise ValueError(problem)


def check_ops_for_target(model_path: Path, target: str, opset: int) -> None:
    """Every standard-domain op must exist at the target's opset; otherwise one clear error naming the op."""
    model = onnx.load(str(model_path), load_external_data=False)
    imported = {imp.domain or "ai.onnx": imp.version for imp in model.opset_import}
    if imported.get("ai.onnx", 0) > opset:
        raise StageError(
            "quantize", f"target '{target}' runs ONNX opset ≤ {opset} but the model uses opset {imported['ai.onnx']}"
        )
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            try:
                onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                raise StageError(
                    "quantize",
                    f"op '{node.op_type}' (node '{node.name}') is not available at opset {opset} on target '{target}'",
                ) from None


@register_stage(QuantizeConfig, version=2)
def run_quantize(art: Artifact, cfg: QuantizeConfig, ctx: StageContext) -> Artifact:
    """Convert each target's model to its precision; ORT format and mobile check where the profile asks."""

    def text_feeds(tm: TargetModel) -> list[dict]:
        loaded = load_from_artifact(art, ctx)
        calib, _ = text_sets(ctx)
        batches = encode(
            loaded, calib[: cfg.calibration_samples], max_length=ctx.run.calibration.max_length, batch_size=1, ctx=ctx
        )
        return [to_numpy_feeds(b, tm.io) for b in batches]

    return quantize_targets(art, cfg, ctx, text_feeds)


def quantize_targets(
    art: Artifact, cfg: QuantizeConfig, ctx: StageContext, calibration_feeds: Callable[[TargetModel], list[dict]]
) -> Artifact:
    """The quantize stage for any model kind: ``calibration_feeds(target_model)`` gives the int8-static
    calibration feeds (called at most once per run, only when a target needs them)."""
    from exporters.mobile import mobile_usability, to_ort_format
    from exporters.onnx import data_file
    from exporters.quantize import convert_precision

    if not art.targets:
        raise StageError("quantize", "no ONNX model yet: put an 'export' stage before 'quantize'")
    problem = cfg.target_problem(ctx.targets)
    if problem:  # preflight() refuses this before any stage runs; direct callers get the same message
        raise StageError("quantize", problem)
    if any((cfg.per_target.get(n) or cfg.precision or p.default_precision) != "fp32" for n, p in ctx.targets.items()):
        warn_without_validate(ctx, "quantize")
    calib_feeds = None
    out = art
    report: dict[str, dict] = {}
    for name in progress_bar(ctx, list(ctx.targets), desc="quantize"):
        prof = ctx.targets[name]
        tm = art.targets[name]
        precision = cfg.precision_for(name, prof)
        src = ctx.resolve(tm.model)
        check_ops_for_target(src, name, prof.opset)
        tdir = ctx.subdir(name)
        dst = tdir / "model.onnx"
        feeds = None
        if precision == "int8-static":
            if calib_feeds is None:
                calib_feeds = calibration_feeds(tm)
            feeds = calib_feeds
        kwargs = {"calibration_feeds": feeds, "per_channel": cfg.per_channel, "weight_type": prof.int8_weight_type}
        if precision == "int8" and cfg.quantize_embeddings:
            kwargs["int8_op_types"] = ("MatMul", "Gemm", "Gather")
        if cfg.keep_fp32_ops is not None:
            kwargs["keep_fp32_ops"] = cfg.keep_fp32_ops
        q = convert_precision(src, dst, precision, **kwargs)
        files = dict(tm.files)
        info = {
            "precision": precision,
            "size_bytes": q.size_bytes,
            "external_data": data_file(dst).is_file(),
            "nodes_quantized": q.nodes_quantized,
            "ops_kept_fp32": list(q.ops_kept_fp32),
        }
        if precision.startswith("int8"):
            info["int8_weights"] = prof.int8_weight_type  # the per-profile choice (TargetProfile.int8_weight_type)
        if prof.ort_format:
            try:
                ort_res = to_ort_format(dst, tdir)
            except ValueError as exc:
                raise StageError("quantize", f"target '{name}' ships ORT format: {exc}") from None
            files["ort"] = ctx.ref(ort_res.ort_path)
            files["required_operators"] = ctx.ref(ort_res.config_path)
            info["ort_size_bytes"] = Path(ort_res.ort_path).stat().st_size
        if prof.mobile_check:
            info["mobile_usability"] = mobile_usability(dst)
        report[name] = info
        out = out.with_target(
            name, TargetModel(model=ctx.ref(dst), precision=precision, io=tm.io, files=files, metrics=dict(tm.metrics))
        )
    ctx.metrics.update({"targets": report})
    return out
