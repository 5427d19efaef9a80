"""Mixed precision (``quantize: {mixed: auto, budget: ...}``) against uniform int8 on all-MiniLM-L6-v2.

Every model is made by the product itself: ``pipeline.run`` with ``export`` + ``quantize`` on the packaged MiniLM
for the raspberry-pi-5 profile (int8, embeddings quantized, its weight type), once uniform and once per budget.
Calibration text: fortunes.txt passages 64.. (the stage measures sensitivity and the budget on these).
Held-out: fortunes.txt passages 0..63, never seen by the stage.

Measured side by side in ONE process:
- size on disk;
- latency at batch 1 x seq 128, ``--threads`` intra-op threads, ``--rounds`` rounds of ``--runs`` interleaved runs;
  ratio = median(variant) / median(uniform int8) within a round (the machine is shared and noisy: quote ratios);
- fidelity: cosine of mean-pooled embeddings vs PyTorch fp32 on the held-out passages (mean / min).

Run: OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/bench_mixed_precision.py [--budgets 0.995 0.998]
     [--granularity matmul] [--out benchmarks/results/mixed_precision.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FORTUNES = (
    next(
        (p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if (p / "data" / "fortunes.txt").is_file()),
        REPO.parent / "shared",
    )
    / "data"
    / "fortunes.txt"
)  # a git worktree under <root>/wt/<name> shares <root>/shared
TARGET = "raspberry-pi-5"


def _passages(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def _run(work: Path, calib_file: Path, quantize: dict, calib_samples: int) -> dict:
    import pipeline

    cfg = {
        "targets": [TARGET],
        "calibration": {"file": str(calib_file), "samples": calib_samples, "heldout": 8, "max_length": 128},
        "stages": [{"export": {}}, {"quantize": {"precision": "int8", **quantize}}],
    }
    t0 = time.perf_counter()
    report = pipeline.run(cfg, workdir=work, progress=False)
    q = next(s for s in report["stages"] if s["name"] == "quantize")
    return {"metrics": q["metrics"]["targets"][TARGET], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.995, 0.998])
    ap.add_argument("--granularity", choices=("matmul", "block"), default="matmul")
    ap.add_argument("--order", choices=("sensitivity", "sensitivity_per_ms"), default="sensitivity")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fortunes", type=Path, default=FORTUNES)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mixed_precision.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("root").setLevel(logging.ERROR)  # ORT quantizer's pre-processing nag
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime as ort
    import torch

    from pipeline.models import default_model_path, load_model
    from runtimes.fidelity import mean_pool
    from runtimes.session import feeds_for, make_session

    torch.set_num_threads(args.threads)
    texts = _passages(args.fortunes)
    heldout = texts[:64]
    work = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    calib_file = work / "calibration.txt"
    calib_file.write_text("\n".join(texts[64 : 64 + args.calib_samples + 8]) + "\n")
    run_dir = work / "run"
    models: dict[str, Path] = {}
    info: dict[str, dict] = {}

    def keep(label: str, res: dict) -> None:
        dst = work / f"{len(models)}.onnx"
        shutil.copyfile(run_dir / TARGET / "model.onnx", dst)
        models[label] = dst
        info[label] = res

    keep("uniform int8", _run(run_dir, calib_file, {}, args.calib_samples))
    models["fp32"] = next((run_dir / "stages").glob("01-export/*/model.onnx"))
    info["fp32"] = {}
    sens = {"granularity": args.granularity, "order": args.order}
    for b in args.budgets:
        keep(f"mixed, min_cos_mean {b:g}", _run(run_dir, calib_file, {"sensitivity": sens, "mixed": "auto",
             "budget": {"min_cos_mean": b}}, args.calib_samples))  # fmt: skip

    # ---- fidelity on held-out passages vs PyTorch fp32
    loaded = load_model(default_model_path())
    tok, hf = loaded.tokenizer, loaded.model.eval()
    sessions = {k: make_session(p, threads=args.threads) for k, p in models.items()}
    cos: dict[str, list[np.ndarray]] = {k: [] for k in models}
    for i in range(0, len(heldout), 8):
        enc = tok(heldout[i : i + 8], padding=True, truncation=True, max_length=128, return_tensors="np")
        with torch.no_grad():
            ref = hf(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
        r = mean_pool(ref, enc["attention_mask"])
        for k, s in sessions.items():
            g = mean_pool(s.run(None, feeds_for(s, enc))[0], enc["attention_mask"])
            cos[k].append(np.sum(r * g, axis=1))

    # ---- latency, interleaved
    rng = np.random.default_rng(0)
    enc = {
        "input_ids": rng.integers(1000, 20000, (1, 128)).astype(np.int64),
        "attention_mask": np.ones((1, 128), np.int64),
        "token_type_ids": np.zeros((1, 128), np.int64),
    }
    feeds = {k: feeds_for(s, enc) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    ratios: dict[str, list[float]] = {k: [] for k in sessions}
    vs32: dict[str, list[float]] = {k: [] for k in sessions}
    p50: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        lat: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.runs):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, feeds[k])
                lat[k].append((time.perf_counter() - t0) * 1e3)
        for k in sessions:
            ratios[k].append(float(np.median(lat[k]) / np.median(lat["uniform int8"])))
            vs32[k].append(float(np.median(lat[k]) / np.median(lat["fp32"])))
            p50[k].append(float(np.median(lat[k])))

    order = ["fp32", "uniform int8", *[k for k in models if k.startswith("mixed")]]
    rows = []
    for k in order:
        c = np.concatenate(cos[k])
        m = info[k].get("metrics", {})
        mixed = m.get("mixed") or {}
        kept = f"{len(mixed['kept_fp32'])}/{mixed['units']}: {', '.join(mixed['kept_fp32'])}" if mixed else "–"
        calib = f"{mixed['cos_mean']:.5f}" if mixed else "–"
        secs = f"{info[k]['seconds']:.0f} s" if "seconds" in info[k] else "–"  # fp32: the export, not timed here
        rows.append(
            f"| {k} | {models[k].stat().st_size / 1e6:.1f} | {kept} | {calib} | {c.mean():.5f} | {c.min():.5f} |"
            f" {np.median(p50[k]):.1f} | {', '.join(f'{x:.3f}' for x in ratios[k])} |"
            f" {', '.join(f'{x:.3f}' for x in vs32[k])} | {secs} |"
        )
    first_mixed = next((info[k]["metrics"] for k in order if k.startswith("mixed")), None)
    sens_rows = []
    if first_mixed:
        s = first_mixed["sensitivity"]
        top = sorted(s["rows"], key=lambda r: -r["sensitivity"])
        for r in top[:12]:
            sens_rows.append(
                f"| {r['unit']} | {r['params']} | {r['sensitivity']:.3g} | {r['token_cos_min']:.4f} |"
                f" {r['fp32_ms']:.3f} | {r['quantized_ms']:.3f} | {100 * r['latency_share']:.1f} % |"
            )
        lat_s = s["latency"]
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = "OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python benchmarks/bench_mixed_precision.py " + " ".join(sys.argv[1:])
    md = [
        "## Mixed precision (`mixed: auto`) vs uniform int8 (all-MiniLM-L6-v2, raspberry-pi-5 profile)",
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Host: `{uname}`, nproc {os.cpu_count()}; onnxruntime {ort.__version__}, torch {torch.__version__};"
        f" date {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; load average at the end {load}",
        f"- Models made by `pipeline.run` (export + quantize int8, embeddings quantized, unit = {args.granularity},"
        f" order = {args.order}); the stage measured sensitivity and the budget on {args.calib_samples} calibration"
        " passages (fortunes.txt 64..), against the dense PyTorch model.",
        f"- Held-out fidelity: cosine of mean-pooled embeddings vs PyTorch fp32 on fortunes.txt passages 0..63"
        f" (batches of 8, truncation 128). Latency: one process, {args.threads} intra-op threads, batch 1 x seq 128,"
        f" {args.rounds} rounds of {args.runs} interleaved runs; ratios per round.",
        "",
        "| variant | size MB | units kept fp32 | stage-measured cos_mean (calibration) | held-out cos mean | held-out cos min"
        " | p50 ms | ratio vs uniform int8 (per round) | ratio vs fp32 (per round) | pipeline time |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if sens_rows:
        md += [
            f"Most sensitive units (first mixed run; sensitivity = 1 - cos_mean with only that unit int8, vs fp32 ONNX;"
            f" ORT profiler at {lat_s['threads']} threads: fp32 kernels {lat_s['fp32_total_ms']:.1f} ms, int8"
            f" {lat_s['quantized_total_ms']:.1f} ms per passage, {100 * lat_s['attributed_share_fp32']:.0f} % of fp32"
            " kernel time attributed to units):",
            "",
            "| unit | params | sensitivity | token cos min | fp32 ms | int8 ms | fp32 latency share |",
            "|---|---|---|---|---|---|---|",
            *sens_rows,
            "",
        ]
    text = "\n".join(md)
    print(text)
    (work / "metrics.json").write_text(json.dumps({k: v.get("metrics") for k, v in info.items()}, default=str))
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
