"""benchmark: latency p50/p95 and peak RSS of each target's model on this host, in a fresh process per target
(the on-device evaluation script, so the numbers are the model's own), plus model size; and the model's memory
against the profile's ``memory_budget_mb``, measured in a fresh numpy + onnxruntime process
(:mod:`runtimes.memory`): over the budget fails the target."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.artifact import Artifact, TargetModel
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import (
    encode,
    load_from_artifact,
    model_max_positions,
    progress_bar,
    text_sets,
    to_numpy_feeds,
    write_target_bundle,
)

__all__ = ["BenchmarkConfig", "run_benchmark", "time_target"]


class BenchmarkConfig(StageConfig):
    kind = "benchmark"
    runs: int = Field(50, ge=1, description="timed runs per target")
    warmup: int = Field(5, ge=0, description="untimed runs first")
    batch: int = Field(1, ge=1)
    seq: int = Field(128, ge=1, description="tokens per sequence (real text, truncated)")
    threads: int | None = Field(
        None, ge=1, description="intra-op threads; omitted = the profile's, capped at this host's cores"
    )


@register_stage(BenchmarkConfig)
def run_benchmark(art: Artifact, cfg: BenchmarkConfig, ctx: StageContext) -> Artifact:
    """Time each target's model in a subprocess and record latency, peak RSS and size."""
    from exporters.onnx import torch_reference
    from runtimes.memory import budget_failure

    if not art.targets:
        raise StageError("benchmark", "no ONNX model yet: put an 'export' stage before 'benchmark'")
    loaded = load_from_artifact(art, ctx, reference=True)
    _, heldout = text_sets(ctx)
    text = " ".join(heldout)
    batch = encode(
        loaded, [text] * cfg.batch, max_length=cfg.seq, batch_size=cfg.batch, ctx=ctx, setting="benchmark.seq"
    )[0]
    limit = model_max_positions(loaded.model)
    failures: list[dict] = []
    out = art
    summary = {}
    ref_cache: dict[str, dict] = {}
    for name in progress_bar(ctx, list(ctx.targets), desc="benchmark"):
        prof = ctx.targets[name]
        tm = art.targets[name]
        feeds = to_numpy_feeds(batch, tm.io)
        key = ",".join(sorted(feeds))
        if key not in ref_cache:
            ref_cache[key] = torch_reference(loaded, feeds)
        ref = ref_cache[key]
        entry = time_target(ctx, name, tm, feeds, ref, cfg, seq=int(np.asarray(feeds["input_ids"]).shape[1]))
        entry["memory"] = mem = _measure_memory(ctx, loaded, text, prof, tm, cfg, entry["threads"], limit)
        fail = budget_failure(name, prof.memory_budget_mb, mem, measured=True)
        failures.extend([fail] if fail else [])
        summary[name] = entry
        metrics = {
            **dict(tm.metrics),
            "latency_ms": entry["latency_ms"],
            "peak_rss_mb": entry["peak_rss_mb"],
            "benchmark": entry,
            "memory_measured": mem,
        }
        out = out.with_target(
            name, TargetModel(model=tm.model, precision=tm.precision, io=tm.io, files=dict(tm.files), metrics=metrics)
        )
    ctx.metrics.update({"targets": summary, "failures": failures})
    return out


def time_target(
    ctx: StageContext, name: str, tm: TargetModel, feeds: dict, ref: dict, cfg: BenchmarkConfig, **shape: int
) -> dict[str, Any]:
    """Time target ``name``'s model in a fresh process: its bundle (``feeds`` and the reference outputs ``ref``)
    written under ``ctx.subdir(name)``, ``cfg.runs`` timed runs after ``cfg.warmup`` on ``cfg.threads`` (omitted:
    the profile's) threads, capped at this host's cores.

    Returns:
        The target's report entry: ``latency_ms`` (p50/p95/...), ``peak_rss_mb`` (MiB), ``provider``, ``threads``,
        ``batch``, then ``shape`` (e.g. ``seq``), ``size_bytes`` (external data included), ``outputs_ok``,
        ``measured_on``.
    """
    from exporters.onnx import model_bytes
    from runtimes.benchmark import benchmark_bundle

    prof = ctx.targets[name]
    host_cores = os.cpu_count() or 1
    threads = min(cfg.threads or prof.threads or host_cores, host_cores)
    bdir = write_target_bundle(
        ctx, ctx.subdir(name), prof, tm, feeds, ref, threads=threads, runs=cfg.runs, warmup=cfg.warmup
    )
    res = benchmark_bundle(bdir, runs=cfg.runs, threads=threads)
    return {
        "latency_ms": res["latency_ms"],
        "peak_rss_mb": res["peak_rss_mb"],
        "provider": res.get("provider"),
        "threads": threads,
        "batch": cfg.batch,
        **shape,
        "size_bytes": model_bytes(ctx.resolve(tm.model)),
        "outputs_ok": res.get("ok"),
        "measured_on": "this host (not the device)",
    }


def _measure_memory(ctx: StageContext, loaded, text: str, prof, tm: TargetModel, cfg: BenchmarkConfig, threads, limit):
    """The model's memory (MiB) in a fresh process at the largest configured batch x seq (calibration, static
    shapes, this stage's own), a decoder's KV cache filled to the profile's max context."""
    from runtimes.memory import max_context, measure_memory, memory_feeds, memory_shape

    b, s = memory_shape(ctx.run.calibration, prof, limit)
    if prof.static_shapes is None:
        b, s = max(b, cfg.batch), max(s, min(cfg.seq, limit or cfg.seq))
    batch = encode(loaded, [text] * b, max_length=s, batch_size=b, ctx=ctx, setting="calibration.max_length")[0]
    context = max_context(prof, limit) if tm.io.get("with_past") else None
    np_feeds = to_numpy_feeds(batch, tm.io)
    if prof.static_shapes is not None:  # a fixed-shape model takes exactly (batch, seq): pad / truncate
        from exporters.static_shapes import fit_feeds

        np_feeds = fit_feeds(np_feeds, b, s)[0][0]
    feeds = memory_feeds(np_feeds, tm.io, context)
    try:
        mem = measure_memory(ctx.resolve(tm.model), feeds, threads=threads, providers=prof.providers)
    except RuntimeError as exc:
        raise StageError("benchmark", f"target '{prof.name}': memory: {exc}") from None
    seq = int(feeds["input_ids"].shape[1])
    return {**mem, "batch": b, "seq": seq, "context": context, "budget_mb": prof.memory_budget_mb}
