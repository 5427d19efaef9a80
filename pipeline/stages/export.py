"""export: the PyTorch model -> ONNX (dynamic batch/sequence axes; KV cache for decoders), once per opset."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from pipeline.artifact import Artifact, TargetModel
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_from_artifact, text_sets, to_numpy_feeds

__all__ = ["ExportConfig", "run_export"]


class ExportConfig(StageConfig):
    kind = "export"
    exporter: Literal["dynamo", "optimum"] = Field("dynamo", description="torch.onnx dynamo exporter, or optimum's main_export")
    opset: Optional[int] = Field(None, ge=13, le=24, description="ONNX opset; omitted = each target profile's opset")
    with_past: Optional[bool] = Field(None, description="decoders: export the KV cache (past/present); default on for decoders")
    cross_check: bool = Field(False, description="also export with the other exporter and compare their outputs on calibration text")


def _io_record(res) -> dict:
    d = dataclasses.asdict(res)
    d.pop("path", None)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@register_stage(ExportConfig)
def run_export(art: Artifact, cfg: ExportConfig, ctx: StageContext) -> Artifact:
    """Export to ONNX once per distinct opset among the targets and check it against PyTorch."""
    import onnxruntime as ort

    from exporters.onnx import export_onnx, torch_reference

    loaded = load_from_artifact(art, ctx)
    by_opset: dict[int, list[str]] = {}
    for name, prof in ctx.targets.items():
        opset = cfg.opset or prof.opset
        if opset > prof.opset:
            raise StageError("export", f"opset {opset} is newer than target '{name}' supports (≤ {prof.opset})")
        by_opset.setdefault(opset, []).append(name)

    calib, _ = text_sets(ctx)
    batch = encode(loaded, calib[:4], max_length=ctx.run.calibration.max_length, batch_size=4)[0]
    exports = {}
    out = art
    for opset, names in sorted(by_opset.items()):
        res = export_onnx(loaded, ctx.subdir(f"opset{opset}"), opset=opset, exporter=cfg.exporter, with_past=cfg.with_past)
        io = _io_record(res)
        feeds = to_numpy_feeds(batch, io)
        ref = torch_reference(loaded, feeds)
        sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
        got = dict(zip(res.output_names, sess.run(list(res.output_names), feeds)))
        first = res.output_names[0]
        m = np.asarray(feeds["attention_mask"], bool)
        diff = float(np.abs(got[first] - ref[first])[m].max())
        entry = {"exporter": cfg.exporter, "size_bytes": res.path.stat().st_size, "max_abs_diff_vs_torch": diff, "targets": names, "with_past": res.with_past}
        if cfg.cross_check:
            other = "optimum" if cfg.exporter == "dynamo" else "dynamo"
            res2 = export_onnx(loaded, ctx.subdir(f"opset{opset}-{other}"), opset=opset, exporter=other, with_past=cfg.with_past)
            s2 = ort.InferenceSession(str(res2.path), providers=["CPUExecutionProvider"])
            got2 = dict(zip(res2.output_names, s2.run(list(res2.output_names), to_numpy_feeds(batch, _io_record(res2)))))
            entry["cross_check"] = {"exporter": other, "max_abs_diff": float(np.abs(got2[first] - got[first])[m].max())}
        exports[f"opset{opset}"] = entry
        for name in names:
            out = out.with_target(name, TargetModel(model=ctx.ref(res.path), precision="fp32", io=io))
    ctx.metrics.update({"exports": exports})
    return out
