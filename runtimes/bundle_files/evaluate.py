#!/usr/bin/env python3
"""Standalone on-device evaluator for an edgepipe bundle.

Needs only numpy + onnxruntime (+ the standard library). Run inside the bundle folder:

    python evaluate.py [--runs N] [--threads T] [--provider P] [--save-outputs out.npz]

It loads the model with the preferred providers from bundle.json that this onnxruntime
has (falling back to CPU), checks the outputs against reference.npz (max abs diff and
per-row cosine on valid, non-padded positions), measures latency p50/p95 over ``runs``
after ``warmup`` runs, reads peak RSS, and prints ONE JSON object. Exit code 0 when the
outputs are within tolerance, 1 when not, 2 on usage/setup errors and crashes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MB.

    Linux: VmHWM from /proc/self/status, the high-water mark of this program's own address space.
    ru_maxrss is not used there because Linux carries it across fork+exec, so a script started by a large
    parent process would report the parent's peak. Elsewhere: ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def valid_rows(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(rows, last_dim) float64 view, keeping positions where mask != 0 when arr is (B, S, ...)."""
    a = arr.astype(np.float64)
    if mask is not None and a.ndim >= 3 and a.shape[:2] == mask.shape:
        a = a[mask.astype(bool)]  # (B, S, ..., D) -> (n_valid, ..., D): padded positions carry no meaning
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(math.prod(a.shape[:-1]), a.shape[-1])  # -1 fails when D = 0


def check(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float, mask: np.ndarray | None) -> dict:
    """Metrics for one output: shape, max abs diff, min row cosine, and the element tolerance verdict."""
    if ref.shape != got.shape:
        return {"shape_ok": False, "max_abs_diff": math.inf, "cosine_min": float("nan"), "within_tol": False}
    r, g = valid_rows(ref, mask), valid_rows(got, mask)
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(g))):
        return {"shape_ok": True, "max_abs_diff": math.inf, "cosine_min": float("nan"), "within_tol": False}
    diff = np.abs(g - r)
    nr, ng = np.linalg.norm(r, axis=-1), np.linalg.norm(g, axis=-1)
    cos = np.where((nr == 0) & (ng == 0), 1.0, np.sum(r * g, axis=-1) / np.maximum(nr * ng, 1e-12))
    return {
        "shape_ok": True,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "cosine_min": float(cos.min()) if cos.size else float("nan"),
        "within_tol": bool(np.all(diff <= atol + rtol * np.abs(r))),
    }


def verdict(
    reference: dict, outputs: dict, atol: float, rtol: float, min_cosine: float | None, mask: np.ndarray | None
) -> tuple[bool, dict]:
    """(ok, per-output metrics): every output has the right shape, is within ``atol + rtol |ref|`` everywhere and,
    when ``min_cosine`` is given, has a (defined) minimum row cosine >= it. The host's ``runtimes.compare`` rule;
    a test holds the two to identical verdicts."""
    per_output = {
        n: check(reference[n], outputs[n], atol, rtol, mask)
        if n in outputs
        else {"shape_ok": False, "max_abs_diff": math.inf, "cosine_min": float("nan"), "within_tol": False}
        for n in reference
    }

    def one_ok(r: dict) -> bool:
        cos_ok = min_cosine is None or (not math.isnan(r["cosine_min"]) and r["cosine_min"] >= min_cosine)
        return r["shape_ok"] and r["within_tol"] and cos_ok

    return all(one_ok(r) for r in per_output.values()), per_output


def pick_providers(preferred: list[str], forced: str | None) -> list[str]:
    have = ort.get_available_providers()
    wanted = [forced] if forced else preferred
    chosen = [p for p in wanted if p in have and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def json_safe(x: float | None) -> float | None:
    """JSON has no inf/NaN: report them as null."""
    return None if x is None or not math.isfinite(x) else x


def main(argv: list[str] | None = None) -> int:
    cfg = json.loads((HERE / "bundle.json").read_text())
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=cfg["runs"], help="timed runs (default from bundle.json)")
    ap.add_argument("--warmup", type=int, default=cfg["warmup"], help="untimed warm-up runs")
    ap.add_argument("--threads", type=int, default=cfg["threads"], help="intra-op threads")
    ap.add_argument("--provider", default=None, help="force one execution provider (CPU fallback kept)")
    ap.add_argument(
        "--save-outputs", default=None, help="also write the checked outputs to this .npz (host-vs-device comparison)"
    )
    args = ap.parse_args(argv)
    if args.runs < 1 or args.threads < 1 or args.warmup < 0:
        print(
            f"runs and threads must be >= 1 and warmup >= 0, got {args.runs}, {args.threads}, {args.warmup}",
            file=sys.stderr,
        )
        return 2

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    providers = pick_providers(cfg["providers"], args.provider)
    sess = ort.InferenceSession(str(HERE / cfg["model_file"]), sess_options=opts, providers=providers)

    with np.load(HERE / "inputs.npz", allow_pickle=False) as z:
        declared = {i.name for i in sess.get_inputs()}
        feeds = {k: z[k] for k in z.files if k in declared}
    with np.load(HERE / "reference.npz", allow_pickle=False) as z:
        reference = {k: z[k] for k in z.files}
    mask_name = cfg.get("mask_input")
    with np.load(HERE / "inputs.npz", allow_pickle=False) as z:
        mask = z[mask_name] if mask_name and mask_name in z.files else None

    names = list(reference)
    outputs = dict(zip(names, sess.run(names, feeds)))
    if args.save_outputs:
        np.savez(args.save_outputs, **outputs)
    ok, per_output = verdict(reference, outputs, cfg["atol"], cfg["rtol"], cfg.get("min_cosine"), mask)
    max_abs = max(r["max_abs_diff"] for r in per_output.values())
    cos_min = min(
        (r["cosine_min"] for r in per_output.values() if not math.isnan(r["cosine_min"])), default=float("nan")
    )

    for _ in range(args.warmup):
        sess.run(names, feeds)
    times_ms: list[float] = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        sess.run(names, feeds)
        times_ms.append((time.perf_counter() - t0) * 1e3)

    result = {
        "ok": bool(ok),
        "max_abs_diff": json_safe(max_abs),
        "cosine_min": json_safe(cos_min),
        "latency_ms": {"p50": percentile(times_ms, 50), "p95": percentile(times_ms, 95)},
        "peak_rss_mb": json_safe(peak_rss_mb()),
        "provider": sess.get_providers()[0],
        "onnxruntime": ort.__version__,
        "model": cfg["model_file"],
        "runs": args.runs,
        "threads": args.threads,
        "outputs": {
            n: {k: json_safe(v) if isinstance(v, float) else v for k, v in r.items()} for n, r in per_output.items()
        },
    }
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        code = main()
    except Exception:  # a crash must not look like "outputs differ" (exit 1)
        import traceback

        traceback.print_exc()
        code = 2
    sys.exit(code)
