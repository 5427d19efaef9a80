"""quantize: per target, convert the fp32 ONNX model to the target's precision and package it
(ORT format + required-operators config + mobile usability report where the profile asks)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import onnx
from pydantic import Field, field_validator, model_validator

from exporters.precision_registry import (
    DEFAULT_CHUNKED_GATHER_BYTES,
    INT4_LM_HEAD,
    ConversionJob,
    Int4Options,
    check_precision,
    precision_spec,
)
from pipeline.artifact import Artifact, TargetModel
from pipeline.errors import StageError
from pipeline.schema import Frozen
from pipeline.sensitivity.config import FidelityBudget, SensitivityOptions
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import (
    encode,
    load_dense,
    load_from_artifact,
    progress_bar,
    text_sets,
    to_numpy_feeds,
    warn_without_validate,
)

__all__ = ["Int4StageOptions", "QuantizeConfig", "check_ops_for_target", "quantize_targets", "run_quantize"]


class Int4StageOptions(Frozen):
    """What the int4 path quantizes besides the linear layers (block size / algorithm come from the profile)."""

    embeddings: bool = Field(True, description="int4 embedding tables (Gather -> GatherBlockQuantized)")
    lm_head: str = Field(
        "int8",
        description="LM head: int4, int8 (8-bit MatMulNBits; default: on the small GPT int4 cut top-1 agreement"
        " 0.96 -> 0.91) or fp32",
    )

    @field_validator("lm_head")
    @classmethod
    def _known_lm_head(cls, v: str) -> str:
        if v not in INT4_LM_HEAD:
            raise ValueError(f"lm_head must be one of {', '.join(INT4_LM_HEAD)}, got {v!r}")
        return v


class QuantizeConfig(StageConfig):
    kind = "quantize"
    precision: str | None = Field(
        None,
        description="one precision for every target (registered in exporters.precision_registry); omitted = each profile's default",
    )
    per_target: dict[str, str] = Field(default_factory=dict, description="precision overrides by target name")
    per_channel: bool = Field(
        True, description="int8: per-channel weight scales (much better fidelity than per-tensor)"
    )
    calibration_samples: int = Field(32, ge=1, description="int8-static: calibration passages")
    quantize_embeddings: bool = Field(
        True, description="int8: also quantize embedding tables (Gather): ~2.5x smaller MiniLM at the same fidelity"
    )
    chunked_embeddings_mb: float | None = Field(
        DEFAULT_CHUNKED_GATHER_BYTES / 2**20,
        ge=0,
        description="int8: embedding tables of at least this many MiB (fp32) are quantized chunk by chunk before ONNX"
        " Runtime's quantizer (same bytes, without its table-sized float copies); null = leave all to ORT",
    )
    keep_fp32_ops: list[str] | None = Field(
        None, description="op types kept in fp32 (default: LayerNorm, Softmax and residual-sensitive ops)"
    )
    sensitivity: SensitivityOptions | None = Field(
        None, description="per-layer sensitivity report joined with ORT profiler latency ({} = defaults)"
    )
    mixed: Literal["auto"] | None = Field(
        None, description="auto: keep the most sensitive layers in fp32 until the measured `budget` is met"
    )
    budget: FidelityBudget | None = Field(None, description="fidelity budget of mixed: auto")

    @model_validator(mode="after")
    def _mixed_with_budget(self) -> QuantizeConfig:
        if (self.mixed is None) != (self.budget is None):
            raise ValueError("mixed: auto and budget go together, e.g. {mixed: auto, budget: {min_cos_mean: 0.99}}")
        return self

    int4: Int4StageOptions = Field(default_factory=Int4StageOptions, description="int4: embeddings and LM head")

    @field_validator("precision")
    @classmethod
    def _registered_precision(cls, v: str | None) -> str | None:
        return None if v is None else check_precision(v)

    @field_validator("per_target")
    @classmethod
    def _registered_per_target(cls, v: dict[str, str]) -> dict[str, str]:
        for p in v.values():
            check_precision(p)
        return v

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

    evidence_cache: dict = {}

    def evidence(tm: TargetModel):
        """Calibration feeds + the dense model's outputs on them: what sensitivity and mixed: auto measure."""
        if not evidence_cache:
            from exporters.onnx import torch_reference
            from pipeline.sensitivity.quantize import Evidence

            feeds, dense, first = text_feeds(tm), load_dense(art), tm.io["output_names"][0]
            ref = [torch_reference(dense, f)[first] for f in feeds]
            evidence_cache[0] = Evidence(feeds, ref, first, load_from_artifact(art, ctx).model)
        return evidence_cache[0]

    return quantize_targets(art, cfg, ctx, text_feeds, evidence)


def quantize_targets(
    art: Artifact,
    cfg: QuantizeConfig,
    ctx: StageContext,
    calibration_feeds: Callable[[TargetModel], list[dict]],
    evidence: Callable[[TargetModel], Any] | None = None,
) -> Artifact:
    """The quantize stage for any model kind: ``calibration_feeds(target_model)`` gives the calibration
    feeds of precisions that need them (int8-static, int4 gptq; called at most once per run, only when needed);
    ``evidence(target_model)`` gives what ``sensitivity`` / ``mixed: auto`` measure
    (pipeline.sensitivity.quantize.Evidence; None = not supported for this model kind)."""
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
        int4 = Int4Options(**prof.int4_settings.model_dump(), embeddings=cfg.int4.embeddings, lm_head=cfg.int4.lm_head)
        feeds = None
        if precision_spec(precision).calibration_needed(ConversionJob(src=src, tmp=dst, tmp_dir=tdir, int4=int4)):
            if calib_feeds is None:
                calib_feeds = calibration_feeds(tm)
            feeds = calib_feeds
            if prof.static_shapes:  # a fixed-shape model takes only (batch, seq) feeds
                from exporters.static_shapes import fit_feeds

                ss = prof.static_shapes
                feeds = [chunk for f in feeds for chunk, _ in fit_feeds(f, ss.batch, ss.seq)]
        kwargs = {
            "calibration_feeds": feeds,
            "per_channel": cfg.per_channel,
            "weight_type": prof.int8_weight_type,
            "int4": int4,
        }
        if precision == "int8" and cfg.quantize_embeddings:
            kwargs["int8_op_types"] = ("MatMul", "Gemm", "Gather")
            mb = cfg.chunked_embeddings_mb
            kwargs["chunked_gather_bytes"] = None if mb is None else int(mb * 2**20)
        if cfg.keep_fp32_ops is not None:
            kwargs["keep_fp32_ops"] = cfg.keep_fp32_ops
        files = dict(tm.files)
        measured: dict = {}
        if cfg.sensitivity is not None or cfg.mixed:
            from pipeline.sensitivity.quantize import BudgetUnmet, measured_convert

            if evidence is None:
                raise StageError("quantize", "sensitivity and mixed: auto need a text model (calibration passages)")
            try:
                m = measured_convert(
                    src, dst, precision, kwargs, options=cfg.sensitivity, budget=cfg.budget,
                    evidence=evidence(tm), work_dir=tdir, threads=min(prof.threads or 1, 2),
                )  # fmt: skip
            except BudgetUnmet as exc:
                raise StageError("quantize", f"target '{name}': {exc}") from None
            q, measured = m.report, m.metrics
            if m.plot is not None:
                files["sensitivity_plot"] = ctx.ref(m.plot)
        else:
            try:
                q = convert_precision(src, dst, precision, **kwargs)
            except ValueError as exc:  # a setting the converter cannot honour (e.g. int4 gptq block layout)
                raise StageError("quantize", f"target '{name}' ({precision}): {exc}") from None
        check_ops_for_target(dst, name, prof.opset)  # a precision may raise the opset (int4 embeddings: 21)
        if prof.static_shapes:  # the quantizer's new nodes carry no shapes: fix and check every dim again
            from exporters.static_shapes import StaticShapeError, make_static

            try:
                make_static(dst, dst, batch=prof.static_shapes.batch, seq=prof.static_shapes.seq)
            except StaticShapeError as exc:
                raise StageError("quantize", f"target '{name}' sets static_shapes: {exc}") from None
        info = {
            "precision": precision,
            "size_bytes": q.size_bytes,
            "external_data": data_file(dst).is_file(),
            "nodes_quantized": q.nodes_quantized,
            "ops_kept_fp32": list(q.ops_kept_fp32),
            **measured,
        }
        if precision.startswith("int8"):
            info["int8_weights"] = prof.int8_weight_type  # the per-profile choice (TargetProfile.int8_weight_type)
        if precision == "int4":
            info["int4"] = {**prof.int4_settings.model_dump(), **cfg.int4.model_dump()}
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
