"""Dense vs pruned vs quantized GMM score network: ε_score², Lipschitz, TV certificate, measured TV, latency per
denoising step and size, per precision (= per target: each target runs the precisions its profile lists).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_diffusion.py [--samples 10000] [--steps 25 50 100 200]

Writes benchmarks/results/diffusion.json and benchmarks/results/diffusion_tv_vs_steps.png and prints a Markdown table.
All variants are measured side by side in one process on the same (x, t) points and the same sampler noise; latency is
this host's ONNX Runtime CPU time for one score evaluation (one denoising step) at batch 1 and batch 1024, 1 thread.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporters.quantize import convert_precision
from pipeline.diffusion import (
    histogram_tv,
    histogram_tv_floor,
    lipschitz_bound,
    score_error_points,
    score_mse,
    time_grid,
    tv_certificate,
)
from pipeline.diffusion.evaluate import feeds_of, onnx_scorer, prune_linears_
from pipeline.diffusion.metrics import finite_difference_opnorm, jacobian_opnorm
from pipeline.diffusion.network import export_score_onnx, load_score_model, mixture_of
from pipeline.diffusion.samplers import ddpm_sample
from runtimes.session import make_session
from targets import load_target

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "diffusion-gmm" / "score-model"
OUT = ROOT / "benchmarks" / "results"
TARGETS = ("host-cpu", "raspberry-pi-5")
# (label, magnitude sparsity, precision)
VARIANTS = [
    ("dense", 0.0, "fp32"),
    ("dense", 0.0, "int8"),
    ("pruned 30%", 0.3, "fp32"),
    ("pruned 30%", 0.3, "fp16"),
    ("pruned 30%", 0.3, "int8"),
    ("pruned 50%", 0.5, "int8"),
    ("pruned 90% (broken)", 0.9, "int8"),
]


def _latency_ms(sess, d: int, batch: int, runs: int) -> float:
    g = torch.Generator().manual_seed(0)
    feeds = feeds_of(
        torch.randn(batch, d, generator=g, dtype=torch.float64), torch.full((batch,), 0.5, dtype=torch.float64)
    )
    for _ in range(3):
        sess.run(["score"], feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(["score"], feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--cert-steps", type=int, default=200)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = load_score_model(MODEL)
    gmm = mixture_of(base.config)
    sch, T, delta = base.config.schedule, base.config.t_max, base.config.t_min
    x, t, exact = score_error_points(
        gmm, 20_000, T=T, delta=delta, schedule=sch, generator=torch.Generator().manual_seed(11)
    )
    gl = torch.Generator().manual_seed(12)
    grid_c = time_grid(a.cert_steps, T=T, delta=delta, schedule=sch)
    tl = grid_c[torch.randint(len(grid_c), (512,), generator=gl)]
    xl = gmm.sample_t(tl, generator=gl, schedule=sch)
    profiles = {n: load_target(n) for n in TARGETS}
    floor = histogram_tv_floor(gmm, a.samples, generator=torch.Generator().manual_seed(14))
    exact_tv = {}
    for n in a.steps:
        y = ddpm_sample(
            lambda v, s: gmm.score(v, s, sch),
            a.samples,
            gmm.d,
            time_grid(n, T=T, delta=delta, schedule=sch),
            schedule=sch,
            generator=torch.Generator().manual_seed(13),
        )
        exact_tv[n] = histogram_tv(y, gmm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, sparsity, precision in VARIANTS:
            model = load_score_model(MODEL)
            if sparsity:
                prune_linears_(model, method="magnitude", sparsity=sparsity)
            fp32 = export_score_onnx(model, Path(tmp) / f"{label}-{sparsity}.onnx", opset=18)
            path = Path(tmp) / f"{label}-{sparsity}-{precision}.onnx"
            convert_precision(fp32, path, precision)
            sess = make_session(path, threads=1)
            fn = onnx_scorer(sess)
            err = score_mse(fn(x, t), exact)
            tv = {}
            for n in a.steps:
                y = ddpm_sample(
                    fn,
                    a.samples,
                    gmm.d,
                    time_grid(n, T=T, delta=delta, schedule=sch),
                    schedule=sch,
                    generator=torch.Generator().manual_seed(13),
                )
                tv[n] = histogram_tv(y, gmm)
            cert = tv_certificate(gmm, sch, grid_c, err["mse"])
            row = {
                "variant": label,
                "sparsity": sparsity,
                "precision": precision,
                "targets": [n for n, p in profiles.items() if precision in p.precisions],
                "eps_score2": err["mse"],
                "eps_score2_relative": err["relative"],
                "lipschitz_jacobian_torch_fp32": float(
                    jacobian_opnorm(lambda v, s, model=model: model(v.float(), s.float()), xl, tl).max()
                ),
                "lipschitz_fd_onnx": float(finite_difference_opnorm(fn, xl, tl).max()),
                "certificate": cert["total"],
                "certificate_score_limited": cert["score_limited"],
                "tv_measured": tv,
                "latency_ms_batch1": _latency_ms(sess, gmm.d, 1, a.runs),
                "latency_ms_batch1024": _latency_ms(sess, gmm.d, 1024, a.runs),
                "size_bytes": path.stat().st_size,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "command": "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_diffusion.py "
        + " ".join(
            [f"--samples {a.samples}", "--steps " + " ".join(map(str, a.steps)), f"--cert-steps {a.cert_steps}"]
        ),
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "lipschitz_bound_max": float(lipschitz_bound(gmm, tl, sch).max()),
        "lipschitz_exact_max": float(torch.linalg.matrix_norm(gmm.hessian(xl, tl, sch), ord=2).max()),
        "tv_floor": floor,
        "tv_exact_score": exact_tv,
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "diffusion.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, a.steps)
    _table(result, a)


def _plot(result: dict, steps: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [result["tv_exact_score"][n] for n in steps], "k--", label="exact score")
    for r in result["rows"]:
        ax.plot(steps, [r["tv_measured"][n] for n in steps], marker="o", label=f"{r['variant']} {r['precision']}")
    ax.axhline(result["tv_floor"], color="grey", lw=0.8, ls=":", label="estimator floor (exact samples)")
    ax.set_xscale("log")
    ax.set_xlabel("DDPM steps (exponential grid)")
    ax.set_ylabel("histogram TV to p_0")
    ax.set_title("GMM score network: TV vs steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "diffusion_tv_vs_steps.png", dpi=110)
    plt.close(fig)


def _table(result: dict, a) -> None:
    last = a.steps[-1]
    print(
        f"\n| variant | precision | targets | ε_score² | rel. | Lipschitz (Jacobian, torch) | Lipschitz (FD, ONNX) | certificate @{a.cert_steps} | score-limited cert. | TV @{last} | ms/step b=1 | ms/step b=1024 | size KB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['variant']} | {r['precision']} | {', '.join(r['targets'])} | {r['eps_score2']:.4g} | {r['eps_score2_relative']:.3g} | "
            f"{r['lipschitz_jacobian_torch_fp32']:.3g} | {r['lipschitz_fd_onnx']:.3g} | {r['certificate']:.3g} | {r['certificate_score_limited']:.3g} | "
            f"{r['tv_measured'][last]:.4f} | {r['latency_ms_batch1']:.3f} | {r['latency_ms_batch1024']:.3f} | {r['size_bytes'] / 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
