#!/usr/bin/env python3
"""Measure one ONNX model's resident memory in a fresh process (needs only numpy + onnxruntime).

Run as a script, never imported by the pipeline (so nothing else is loaded into the process)::

    python memory_probe.py MODEL INPUTS.npz [--threads T] [--providers P,Q] [--runs N]

Method (Linux): after importing numpy + onnxruntime, read the resident set size (``VmRSS`` in
``/proc/self/status``) as the baseline; load the inputs (they count: a decoder's KV cache is one); create the
session; return the heap the load freed to the system (glibc ``malloc_trim``); reset the high-water mark by writing
``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so that the session-creation transient (the parsed
protobuf, initializers before pre-packing) does not count; run inference ``runs`` times; read ``VmHWM``.
``model_mb = VmHWM - baseline``: weights as ONNX Runtime holds them (pre-packed copies included), the arena
and every activation of the largest run. The interpreter, numpy and onnxruntime's own code pages are in
the baseline and do not count. ``load_peak_mb`` (the high-water mark during session creation, minus the
baseline) is reported too. Where ``clear_refs`` cannot be written, ``hwm_reset`` is false and
``model_mb`` includes the load transient (an over-estimate). Elsewhere than Linux, ``ru_maxrss`` is used the
same way without a reset.

Prints one JSON object; exit code 0, or 2 with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), None where there is no /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Return freed heap pages to the system (glibc): the session-creation garbage (the parsed protobuf, the
    initializers replaced by pre-packed copies) then stops counting, as it would once the allocator reuses it."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("inputs", help=".npz of the feeds (name -> array)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--providers", default="CPUExecutionProvider")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    providers = [p for p in args.providers.split(",") if p in have and p != "CPUExecutionProvider"]
    providers.append("CPUExecutionProvider")

    proc = _status_kb("VmRSS") is not None
    base_kb = _status_kb("VmRSS") if proc else _maxrss_kb()
    with np.load(args.inputs, allow_pickle=False) as z:  # after the baseline: the inputs (a KV cache) count
        feeds = {k: np.ascontiguousarray(z[k]) for k in z.files}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    sess = ort.InferenceSession(args.model, sess_options=opts, providers=providers)
    load_hwm_kb = _status_kb("VmHWM") if proc else _maxrss_kb()
    after_load_kb = _status_kb("VmRSS") if proc else None
    trimmed = _malloc_trim()
    after_trim_kb = _status_kb("VmRSS") if proc else None
    reset = proc and _reset_hwm()
    declared = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in declared}
    names = [o.name for o in sess.get_outputs()]
    for _ in range(max(1, args.runs)):
        outs = sess.run(names, feeds)
        del outs
    peak_kb = _status_kb("VmHWM") if proc else _maxrss_kb()
    if base_kb is None or peak_kb is None:
        print("cannot read resident memory on this platform", file=sys.stderr)
        return 2
    mb = 1 / 1024
    print(
        json.dumps(
            {
                "model_mb": round((peak_kb - base_kb) * mb, 2),
                "load_peak_mb": round((load_hwm_kb - base_kb) * mb, 2) if load_hwm_kb is not None else None,
                "after_load_mb": round((after_load_kb - base_kb) * mb, 2) if after_load_kb is not None else None,
                "after_trim_mb": round((after_trim_kb - base_kb) * mb, 2) if after_trim_kb is not None else None,
                "malloc_trim": trimmed,
                "baseline_mb": round(base_kb * mb, 2),
                "hwm_reset": bool(reset),
                "method": "VmHWM after clear_refs reset minus VmRSS before the session"
                if reset
                else ("VmHWM minus VmRSS before the session (no reset)" if proc else "ru_maxrss minus baseline"),
                "provider": sess.get_providers()[0],
                "threads": args.threads,
                "runs": max(1, args.runs),
            }
        )
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # one line for the caller; the traceback stays out of the report
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(2)
