"""A target's memory budget: the model's memory estimated from the graph, and measured in a fresh process.

The budget (``memory_budget_mb`` of a target profile, in MiB) counts the model's memory on the device: the rise
in resident memory from just before the ONNX Runtime session is created to the peak during inference, at the
profile's threads and at the largest configured batch x sequence (:func:`memory_shape`); the interpreter does
not count.

- :func:`measure_memory` runs ``runtimes/memory_probe.py`` in a fresh interpreter that imports only numpy and
  onnxruntime: baseline ``VmRSS``, create the session, ``malloc_trim`` (return the load's freed heap),
  reset the high-water mark (``/proc/self/clear_refs`` <- ``5``), run, read ``VmHWM`` (see the probe's docstring).
- :func:`estimate_memory` predicts it from the graph alone: initializer bytes (weights) + MLAS pre-packing
  padding + a fixed session overhead + the activation arena (peak live intermediate bytes from ONNX shape
  inference at batch x seq, times ``arena_factor``) + graph inputs and outputs (for decoders with a KV cache:
  the past fed in and the present returned, at the profile's maximum context).

Both ``arena_factor`` (4.0) and ``overhead_mb`` (10) are [I] constants fitted on all-MiniLM-L6-v2 fp32 and int8
on x86_64 (ONNX Runtime 1.32; measured/estimated within ~2 % from 1x32 to 8x128, benchmarks/results/memory.md):
ONNX Runtime's BFC arena grows in power-of-two regions it keeps, and kernels take scratch space, so the arena
holds about 3.3-4.4x the peak live intermediate bytes. Pre-packing replaces the initializer it packs (ORT
frees the original once every consumer packed it; measured: the same RSS with ``session.disable_prepacking``),
so only its padding counts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ARENA_FACTOR",
    "MIB",
    "OVERHEAD_MB",
    "budget_failure",
    "estimate_memory",
    "feed_shapes",
    "max_context",
    "measure_memory",
    "memory_feeds",
    "memory_shape",
    "memory_summary",
    "without_superseded_estimates",
]

MIB = 1 << 20
ARENA_FACTOR = 4.0  # [I] arena bytes per peak live intermediate byte (fitted, see the module docstring)
OVERHEAD_MB = 10.0  # [I] session, kernels and thread pool, measured as RSS after load less the weights (MiniLM)
_PROBE = Path(__file__).with_name("memory_probe.py")

# op types whose constant right-hand operand MLAS pre-packs (B of (K, N); Gemm may carry transB)
_PACKED_OPS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "QGemm", "FusedMatMul"}


def memory_shape(calibration: Any, profile: Any, limit: int | None) -> tuple[int, int]:
    """The largest configured (batch, sequence): calibration ``batch_size`` x ``max_length`` (what validate runs),
    the sequence capped at the model's position limit; for a profile with ``static_shapes`` exactly that shape
    (a fixed-shape model takes no other)."""
    static = getattr(profile, "static_shapes", None)
    if static is not None:
        return int(static.batch), int(static.seq)
    batch, seq = int(calibration.batch_size), int(calibration.max_length)
    return batch, (min(seq, limit) if limit else seq)


def max_context(profile: Any, limit: int | None) -> int | None:
    """Decoders: the context the KV cache is budgeted at: ``profile.max_context`` capped at the model's position
    limit; the limit when the profile sets none; None when neither is known."""
    want = getattr(profile, "max_context", None)
    if want is None:
        return limit
    return min(int(want), limit) if limit else int(want)


def _past_len(io: Mapping[str, Any], seq: int, context: int | None) -> int:
    if not io.get("with_past") or not context:
        return 0
    return max(0, context - seq)


def feed_shapes(io: Mapping[str, Any], batch: int, seq: int, context: int | None = None) -> dict[str, tuple]:
    """Concrete input shapes of an exported model (``io`` is the exporter's record) at ``batch`` x ``seq``; a
    decoder with a KV cache gets ``past = context - seq`` cached positions: ``past_key_values.*`` are
    ``(batch, kv_heads, past, head_dim)`` and ``attention_mask`` is ``(batch, past + seq)``."""
    past = _past_len(io, seq, context)
    shapes: dict[str, tuple] = {}
    for name in io.get("input_names", ()):
        if name.startswith("past_key_values."):
            shapes[name] = (batch, int(io["num_kv_heads"]), past, int(io["head_dim"]))
        elif name == "attention_mask":
            shapes[name] = (batch, past + seq)
        else:
            shapes[name] = (batch, seq)
    return shapes


def memory_feeds(
    feeds: Mapping[str, np.ndarray], io: Mapping[str, Any], context: int | None = None
) -> dict[str, np.ndarray]:
    """Feeds for the memory measurement: ``feeds`` (a real tokenized ``(B, S)`` batch with an empty past) with a
    decoder's KV cache filled to ``context`` positions (zeros: memory does not depend on the values), the mask
    widened and positions shifted to match."""
    seq = int(np.asarray(feeds["input_ids"]).shape[1])
    past = _past_len(io, seq, context)
    if past == 0:
        return dict(feeds)
    out: dict[str, np.ndarray] = {}
    for name, arr in feeds.items():
        a = np.asarray(arr)
        if name.startswith("past_key_values."):
            out[name] = np.zeros((a.shape[0], a.shape[1], past, a.shape[3]), dtype=a.dtype)
        elif name == "attention_mask":
            out[name] = np.concatenate([np.ones((a.shape[0], past), dtype=a.dtype), a], axis=1)
        elif name == "position_ids":
            out[name] = a + past
        else:
            out[name] = a
    return out


def _nbytes(elem_type: int, dims: list[int]) -> int:
    from onnx import TensorProto, helper

    bits = 4 if elem_type in (TensorProto.INT4, TensorProto.UINT4) else None
    if bits is None:
        try:
            bits = 8 * np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
        except (KeyError, TypeError):
            bits = 32
    return math.ceil(math.prod(dims) * bits / 8)


def _prepack_padding(model: Any, inits: Mapping[str, Any]) -> int:
    """Bytes MLAS adds when it pre-packs constant B operands: N padded to 16 columns (and K to 4 rows for int8)."""
    extra = 0
    for node in model.graph.node:
        if node.op_type not in _PACKED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if len(t.dims) != 2:
            continue
        k, n = int(t.dims[0]), int(t.dims[1])
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            k, n = n, k
        int8 = t.data_type in (2, 3)  # UINT8, INT8
        kp, np_ = (math.ceil(k / 4) * 4 if int8 else k), math.ceil(n / 16) * 16
        extra += _nbytes(t.data_type, [kp, np_]) - _nbytes(t.data_type, [k, n])
    return extra


def _live_peak(model: Any, shapes: Mapping[str, tuple]) -> tuple[int, int, int]:
    """(peak live intermediate bytes, graph input + output bytes, tensors whose shape inference left unknown).

    Walks the nodes in graph (topological) order: an intermediate tensor is live from the node that makes it to
    its last consumer. Graph inputs and outputs are counted once, apart (they are the caller's arrays)."""
    from onnx import helper, shape_inference

    m = model  # the caller's own copy: changed in place, weights never duplicated
    init_names = {t.name for t in m.graph.initializer}
    # large initializers become typed graph inputs: shape inference needs their shapes, not their bytes (it
    # serializes the model, which would copy every weight); small ones stay, as constant shapes for data_prop
    big = [t for t in m.graph.initializer if math.prod(t.dims) > 4096]
    for t in big:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del big
    keep = [t for t in m.graph.initializer if math.prod(t.dims) <= 4096]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    try:
        m = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # an op onnx cannot infer: keep what is known (those tensors count in `unknown`)
        pass
    g = m.graph
    sizes: dict[str, int] = {}
    for vi in [*g.value_info, *g.output, *g.input]:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if all(d >= 0 for d in dims):
            sizes[vi.name] = _nbytes(t.elem_type, dims)
    inits = init_names
    io_names = ({i.name for i in g.input} | {o.name for o in g.output}) - inits
    io_bytes = sum(sizes.get(n, 0) for n in io_names)
    last: dict[str, int] = {}
    for k, node in enumerate(g.node):
        for x in node.input:
            last[x] = k
    live = peak = unknown = 0
    for k, node in enumerate(g.node):
        for y in node.output:
            if not y or y in io_names:
                continue
            if y in sizes:
                live += sizes[y]
            else:
                unknown += 1
        peak = max(peak, live)
        for x in set(node.input):
            if last.get(x) == k and x in sizes and x not in io_names and x not in inits:
                live -= sizes[x]
    return peak, io_bytes, unknown


def estimate_memory(
    model_path: Path,
    shapes: Mapping[str, tuple],
    *,
    io: Mapping[str, Any] | None = None,
    arena_factor: float = ARENA_FACTOR,
    overhead_mb: float = OVERHEAD_MB,
) -> dict[str, Any]:
    """The model's memory on the device, predicted from the graph (no session is created).

    Args:
        model_path: ``.onnx`` file (external data is not read: sizes come from the tensor headers).
        shapes: concrete input shapes (:func:`feed_shapes`).
        io: the exporter's record, for the KV-cache share of the inputs/outputs (decoders).
        arena_factor: arena bytes per peak live intermediate byte ([I], fitted on MiniLM).
        overhead_mb: fixed session overhead in MiB ([I], measured on MiniLM).

    Returns:
        MiB figures: ``weights_mb``, ``prepack_mb``, ``overhead_mb``, ``activations_mb`` (arena), ``io_mb``
        (inputs + outputs), ``kv_cache_mb`` (the past and present caches, part of ``io_mb``), ``total_mb``;
        plus ``live_peak_mb``, ``unknown_shapes`` (tensors not counted), ``batch``, ``seq``, ``context``.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    weights = sum(_nbytes(t.data_type, list(t.dims)) for t in inits.values())
    prepack = _prepack_padding(model, inits)
    live, io_bytes, unknown = _live_peak(model, shapes)  # last use of `model`: it strips the initializers
    ids = shapes.get("input_ids") or next(iter(shapes.values()))
    kv = 0
    context = None
    if io and io.get("with_past"):
        past = next((s for n, s in shapes.items() if n.startswith("past_key_values.")), None)
        if past is not None:
            context = int(past[2]) + int(ids[1])
            n_cache = sum(1 for n in shapes if n.startswith("past_key_values."))  # 2 per layer (key, value)
            itemsize = 4  # past/present stay fp32 at the graph boundary (exporters keep fp32 IO)
            kv = n_cache * int(past[0]) * int(past[1]) * int(past[3]) * itemsize * (int(past[2]) + context)
    acts = arena_factor * live
    total = weights + prepack + overhead_mb * MIB + acts + io_bytes
    r = 2
    return {
        "total_mb": round(total / MIB, r),
        "weights_mb": round(weights / MIB, r),
        "prepack_mb": round(prepack / MIB, r),
        "overhead_mb": overhead_mb,
        "activations_mb": round(acts / MIB, r),
        "live_peak_mb": round(live / MIB, r),
        "io_mb": round(io_bytes / MIB, r),
        "kv_cache_mb": round(kv / MIB, r),
        "arena_factor": arena_factor,
        "unknown_shapes": unknown,
        "batch": int(ids[0]),
        "seq": int(ids[1]),
        "context": context,
        "method": "estimate: initializers + pre-pack padding + overhead + arena_factor x peak live"
        " intermediates (ONNX shape inference) + inputs/outputs",
    }


def measure_memory(
    model_path: Path,
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int,
    providers: list[str] | tuple[str, ...] = ("CPUExecutionProvider",),
    runs: int = 2,
    python: str = sys.executable,
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Measure the model's memory in a fresh ``python`` process that imports only numpy + onnxruntime.

    Returns:
        The probe's JSON: ``model_mb`` (the budgeted figure, MiB), ``load_peak_mb``, ``after_load_mb``,
        ``after_trim_mb``, ``baseline_mb``, ``hwm_reset``, ``method``, ``provider``, ``threads``, ``runs``.

    Raises:
        RuntimeError: the probe failed, timed out or printed no result.
    """
    with tempfile.TemporaryDirectory(prefix="edgepipe-mem-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **{k: np.asarray(v) for k, v in feeds.items()})  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
        cmd = [python, str(_PROBE), str(model_path), str(inputs), "--threads", str(threads)]
        cmd += ["--providers", ",".join(providers), "--runs", str(runs)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"memory probe timed out after {timeout_s} s") from e
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory probe failed (exit {proc.returncode}): {tail[0][:300]}")
    return json.loads(lines[-1])


def budget_failure(target: str, budget_mb: float, figure: Mapping[str, Any], *, measured: bool) -> dict | None:
    """A report failure row when the figure exceeds the budget, else None. The value names the numbers."""
    total = float(figure["model_mb"] if measured else figure["total_mb"])
    if total <= budget_mb:
        return None
    shape = f"{figure.get('batch', '?')}x{figure.get('seq', '?')}"
    if measured:
        value = (
            f"measured {total:.1f} MiB at {shape}, {figure.get('threads')} thread(s)"
            f" (load peak {figure.get('load_peak_mb')} MiB); over by {total - budget_mb:.1f} MiB"
        )
    else:
        kv = f" + KV cache {figure['kv_cache_mb']} at context {figure['context']}" if figure.get("kv_cache_mb") else ""
        value = (
            f"estimated {total:.1f} MiB at {shape} (weights {figure['weights_mb']} + arena {figure['activations_mb']}"
            f" + overhead {figure['overhead_mb']} + io {figure['io_mb']}{kv}); over by {total - budget_mb:.1f} MiB"
        )
    return {"target": target, "check": "memory_budget", "value": value, "limit": f"memory_budget_mb {budget_mb:g}"}


def memory_summary(
    budget_mb: float | None, estimate: Mapping[str, Any] | None, measured: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Budget, figure and headroom for the report: the measured figure where benchmark ran, else the estimate."""
    if budget_mb is None or (estimate is None and measured is None):
        return None
    est = float(estimate["total_mb"]) if estimate else None
    meas = float(measured["model_mb"]) if measured else None
    figure = meas if meas is not None else est
    assert figure is not None  # one of the two is given (checked above)
    return {
        "budget_mb": budget_mb,
        "estimate_mb": est,
        "measured_mb": meas,
        "figure_mb": figure,
        "basis": "measured" if meas is not None else "estimated",
        "headroom_mb": round(budget_mb - figure, 2),
        "ok": figure <= budget_mb,
    }


def without_superseded_estimates(
    failures: list[dict[str, Any]], memory: Mapping[str, Mapping[str, Any] | None]
) -> list[dict[str, Any]]:
    """``failures`` less validate's estimated-memory rows of targets whose measured figure (benchmark) is within
    budget: the estimate predicts, the measurement decides. ``memory`` is target -> :func:`memory_summary`."""
    out = []
    for f in failures:
        m = memory.get(f.get("target", "")) or {}
        estimated = f.get("check") == "memory_budget" and str(f.get("value", "")).startswith("estimated")
        if estimated and m.get("basis") == "measured" and m.get("ok"):
            continue
        out.append(f)
    return out
