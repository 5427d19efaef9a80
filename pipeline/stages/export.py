"""export: the PyTorch model -> ONNX (dynamic batch/sequence axes; KV cache for decoders), once per opset."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from pipeline.artifact import Artifact, TargetModel
from pipeline.errors import StageError
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_from_artifact, text_sets, to_numpy_feeds

if TYPE_CHECKING:
    from pipeline.kernels.change import AttentionChange
    from targets.profile import AttentionOp

__all__ = ["DEFAULT_OPSET", "FUSED_ATTENTION_OPSET", "ExportConfig", "run_export"]

DEFAULT_OPSET = 18  # opset 18: quantize_dynamic, ORT's fp16 converter and .ort conversion all handle it (opset-23 Attention needs MatMul-only int8)
FUSED_ATTENTION_OPSET = 23  # SDPA exports as the standard ONNX Attention op from opset 23


class ExportConfig(StageConfig):
    kind = "export"
    works_on = "export"
    exporter: str = Field(
        "dynamo",
        description="a registered exporter (exporters.registry.exporter_names()): dynamo = torch.onnx dynamo"
        " exporter, optimum = optimum's main_export",
    )
    opset: int | None = Field(
        None,
        ge=13,
        le=24,
        description=f"ONNX opset; omitted = {DEFAULT_OPSET} ({FUSED_ATTENTION_OPSET} after an attention swap, for the fused Attention op)",
    )
    with_past: bool | None = Field(
        None, description="decoders: export the KV cache (past/present); default on for decoders"
    )
    cross_check: bool = Field(
        False,
        description="also export with the first other registered exporter (dynamo <-> optimum) and compare their"
        " outputs on calibration text",
    )
    external_data_mb: float = Field(
        1800.0,
        ge=0,
        description="weights above this many MiB go to model.onnx.data beside model.onnx"
        " (ONNX external data: one protobuf file holds at most 2 GiB); later stages keep the split",
    )

    @field_validator("exporter")
    @classmethod
    def _check_exporter(cls, v: str) -> str:
        from exporters.registry import exporter_names

        allowed = exporter_names()
        if v not in allowed:
            raise ValueError(f"exporter must be one of {allowed}, got {v!r}")
        return v

    def check(self, plan: RunPlan) -> None:
        for name, prof in plan.targets.items():
            if self.opset is not None and self.opset > prof.opset:
                raise ValueError(f"opset {self.opset} is newer than target '{name}' runs (opset ≤ {prof.opset})")


def _run(path, names, feeds) -> dict:
    from runtimes.session import make_session

    sess = make_session(path)
    return dict(zip(names, sess.run(list(names), feeds)))


def _lower_attention(res, change: AttentionChange, names: list[str], ctx: StageContext, opset: int) -> dict[str, Any]:
    """Lower the exported attention per target: {label: (model path, target names)}; zero rewrites is an error."""
    import onnx

    from exporters.attention_lowering import lower_to_block_sparse, lower_to_fused_attention
    from exporters.onnx import data_file, move_onnx, save_onnx

    model = onnx.load(str(res.path))
    by_op: dict[AttentionOp | Literal["block_sparse"], list[str]] = {}
    for name in names:
        op: AttentionOp | Literal["block_sparse"] = (
            "block_sparse" if change.block_sparse else ctx.targets[name].attention_ops[0]
        )
        by_op.setdefault(op, []).append(name)
    out: dict[str, Any] = {}
    for op, tnames in sorted(by_op.items()):
        try:
            if op == "block_sparse":
                lowered, n = lower_to_block_sparse(model, change.block_pattern)
            else:
                lowered, n = lower_to_fused_attention(model, op=op)
        except ValueError as exc:
            raise StageError("export", f"attention lowering to {op} failed: {exc}") from None
        path = ctx.subdir(f"opset{opset}", op) / "model.onnx"
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lower-") as tmp:
            save_onnx(lowered, Path(tmp) / path.name, external=data_file(res.path).is_file())  # keep the export's split
            move_onnx(Path(tmp) / path.name, path)
        ctx.log.info("lowered %d attention node(s) to %s for %s", n, op, ", ".join(tnames))
        out[op] = (path, tnames)
    return out


def _check_fused(path, layers: int) -> dict:
    """Every attention layer must be a fused op or a block-sparse subgraph; none left as MatMul-Softmax-MatMul."""
    import onnx

    from exporters.fusion_check import AttentionNotFused, assert_attention_fused

    try:
        return assert_attention_fused(onnx.load(str(path), load_external_data=False), expected_layers=layers)
    except AttentionNotFused as exc:
        raise StageError("export", f"attention left unfused in {path.name}: {exc}") from None


def _io_record(res) -> dict:
    d = dataclasses.asdict(res)
    d.pop("path", None)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _static_model(path: Path, prof, loaded, ctx: StageContext, done: dict[tuple, Path]) -> Path:
    """``path`` itself, or for a profile with ``static_shapes`` its fixed-shape copy (one per shape, in ``done``)."""
    shapes = prof.static_shapes
    if shapes is None:
        return path
    key = (str(path), shapes.batch, shapes.seq)
    if key not in done:
        from exporters.static_shapes import StaticShapeError, make_static
        from pipeline.stages._common import model_max_positions

        limit = model_max_positions(loaded.model)
        if limit is not None and shapes.seq > limit:
            raise StageError(
                "export",
                f"target '{prof.name}': static_shapes.seq {shapes.seq} is more than the model's {limit} positions",
            )
        dst = path.parent / f"static-b{shapes.batch}-s{shapes.seq}" / "model.onnx"
        try:
            done[key] = make_static(path, dst, batch=shapes.batch, seq=shapes.seq)
        except StaticShapeError as exc:
            raise StageError("export", f"target '{prof.name}' sets static_shapes: {exc}") from None
        ctx.log.info("fixed %s to batch %d, sequence %d for %s", path.name, shapes.batch, shapes.seq, prof.name)
    return done[key]


@register_stage(ExportConfig, version=2)
def run_export(art: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
    """Export to ONNX once per distinct opset among the targets and check it against PyTorch."""
    from exporters.onnx import data_file, export_onnx, model_bytes, torch_reference

    loaded = load_from_artifact(art, ctx)
    by_opset: dict[int, list[str]] = {}
    for name, prof in ctx.targets.items():
        opset = cfg.opset or min(
            prof.opset, FUSED_ATTENTION_OPSET if "attention" in art.torch_changes else DEFAULT_OPSET
        )
        if opset > prof.opset:
            raise StageError("export", f"opset {opset} is newer than target '{name}' runs (opset ≤ {prof.opset})")
        by_opset.setdefault(opset, []).append(name)

    calib, _ = text_sets(ctx)
    batch = encode(loaded, calib[:4], max_length=ctx.run.calibration.max_length, batch_size=4, ctx=ctx)[0]
    from pipeline.kernels.change import AttentionChange

    record = art.torch_changes.get("attention")
    change = AttentionChange.from_record(record) if record else None
    with_past = cfg.with_past
    if change and change.block_sparse:
        if with_past:
            raise StageError("export", "block-sparse attention is lowered without a KV cache; set with_past: false")
        with_past = False
    reference = load_from_artifact(art, ctx, reference=True) if change else loaded
    conf = loaded.model.config
    n_layers = int(getattr(conf, "num_hidden_layers", 0) or getattr(conf, "n_layer", 0))
    exports = {}
    out = art
    for opset, names in sorted(by_opset.items()):
        res = export_onnx(
            loaded,
            ctx.subdir(f"opset{opset}"),
            opset=opset,
            exporter=cfg.exporter,
            with_past=with_past,
            external_data_threshold=int(cfg.external_data_mb * 2**20),
        )
        io = _io_record(res)
        feeds = to_numpy_feeds(batch, io)
        m = np.asarray(feeds["attention_mask"], bool)
        first = res.output_names[0]
        entry: dict[str, Any] = {
            "exporter": cfg.exporter,
            "size_bytes": model_bytes(res.path),
            "targets": names,
            "with_past": res.with_past,
            "external_data": data_file(res.path).is_file(),
        }
        got = _run(res.path, res.output_names, feeds)
        entry["max_abs_diff_vs_torch"] = float(np.abs(got[first] - torch_reference(loaded, feeds)[first])[m].max())
        if cfg.cross_check:
            from exporters.registry import cross_check_exporter

            other = cross_check_exporter(cfg.exporter)
            res2 = export_onnx(
                loaded, ctx.subdir(f"opset{opset}-{other}"), opset=opset, exporter=other, with_past=with_past
            )
            got2 = _run(res2.path, res2.output_names, to_numpy_feeds(batch, _io_record(res2)))
            entry["cross_check"] = {"exporter": other, "max_abs_diff": float(np.abs(got2[first] - got[first])[m].max())}
        groups: dict[str, Any] = {"": (res.path, names)}
        if change:
            groups = _lower_attention(res, change, names, ctx, opset)
            ref = torch_reference(reference, feeds)[first]
            entry["attention"] = {}
            for label, (path, tnames) in groups.items():
                counts = _check_fused(path, n_layers)
                lowered = _run(path, res.output_names, feeds)
                entry["attention"][label] = {
                    **counts,
                    "targets": tnames,
                    "max_abs_diff_vs_torch": float(np.abs(lowered[first] - ref)[m].max()),
                }
        exports[f"opset{opset}"] = entry
        static: dict[tuple, Path] = {}
        for path, tnames in groups.values():
            for name in tnames:
                model = _static_model(Path(path), ctx.targets[name], loaded, ctx, static)
                out = out.with_target(name, TargetModel(model=ctx.ref(model), precision="fp32", io=io))
        if static:
            entry["static_shapes"] = {f"{b}x{s}": ctx.ref(p) for (_, b, s), p in sorted(static.items())}
    ctx.metrics.update({"exports": exports})
    return out
