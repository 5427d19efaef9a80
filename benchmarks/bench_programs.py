"""Compiled SUBLEQ programs: steps/s in ONNX Runtime (Loop and unrolled, fp32 and int8) against the Python
interpreter, file size against N, M and I, and depth/width of the paper's 23-layer construction against the shallow one.

Everything is measured in ONE process, interleaved in rounds (min over rounds), ORT with 1 intra-op thread, batch 1.
The programs are random instruction tables that never reach a fixed point within the budget (so every run executes
exactly the budget), with the code baked into the weights (program_in="weights", the default) unless noted.
Every timed graph is first checked bit-exact against the interpreter.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_programs.py [--rounds 3] [--out benchmarks/results/programs.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exporters.mobile import to_ort_format
from pipeline.programs.build import parity
from pipeline.programs.compile import compile_program
from pipeline.programs.execute import OrtProgram
from pipeline.programs.machine import MachineSpec, interpret, random_program
from pipeline.programs.onnx_export import export_onnx

SPEED_SIZES = [
    ((8, 8, 8), 2000, 16),
    ((16, 32, 32), 300, 16),
    ((32, 64, 64), 40, 8),
]  # (N, M, I), loop budget, unroll T


def non_halting(spec: MachineSpec, budget: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    while True:
        prog = random_program(spec, rng, halt_slot=False)
        if interpret(prog, budget).status == "budget_exhausted":
            return prog


def timed(fn, rounds_out: list, *args) -> None:
    t0 = time.perf_counter()
    fn(*args)
    rounds_out.append(time.perf_counter() - t0)


def speed(rounds: int, tmp: Path) -> list[dict]:
    rows = []
    for nmi, budget, T in SPEED_SIZES:
        spec = MachineSpec(*nmi)
        prog = non_halting(spec, budget)
        for construction in ("shallow", "paper23"):
            cp = compile_program(prog, construction=construction)
            state = cp.layout.encode(prog)[None]
            runners = {}
            for precision in ("fp32", "int8"):
                lp = export_onnx(cp, tmp / f"{construction}_{precision}_loop.onnx", precision=precision)
                up = export_onnx(
                    cp,
                    tmp / f"{construction}_{precision}_unrolled.onnx",
                    precision=precision,
                    variant="unrolled",
                    unroll_steps=T,
                )
                runners[f"loop_{precision}"] = (OrtProgram(lp.path, threads=1), budget, lp.size_bytes)
                runners[f"unrolled_{precision}"] = (OrtProgram(up.path, threads=1), T, up.size_bytes)
            for key, (r, steps, _) in runners.items():  # correctness before timing
                assert parity(prog, cp, r, [prog.memory], steps)["bit_exact"], (nmi, construction, key)
            times: dict[str, list] = {k: [] for k in runners}
            times["python"] = []
            for _ in range(rounds):
                timed(interpret, times["python"], prog, budget)
                for key, (r, steps, _) in runners.items():
                    timed(r.run, times[key], state, steps)
            row = {
                "nmi": nmi,
                "construction": construction,
                "depth": cp.net.depth,
                "budget": budget,
                "unroll": T,
                "python": budget / min(times["python"]),
            }
            for key, (_r, steps, size) in runners.items():
                row[key] = steps / min(times[key])
                row[f"{key}_bytes"] = size
            rows.append(row)
            print(
                f"{nmi} {construction}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if isinstance(v, float)),
                flush=True,
            )
            del runners
    return rows


def sizes(tmp: Path) -> list[dict]:
    base = (8, 8, 8)
    grid = (
        [(n, 8, 8) for n in (4, 8, 16, 32)]
        + [(8, m, 8) for m in (4, 16, 32, 64)]
        + [(8, 8, i) for i in (4, 16, 32, 64)]
    )
    rows = []
    for nmi in dict.fromkeys([base] + grid):
        prog = random_program(MachineSpec(*nmi), np.random.default_rng(1))
        cp = compile_program(prog)
        st = cp.stats()
        row = {
            "nmi": nmi,
            "depth": st["depth"],
            "max_width": st["max_width"],
            "weights": st["weights"],
            "nonzeros": st["nonzeros"],
        }
        for precision in ("fp32", "int8"):
            row[f"{precision}_bytes"] = export_onnx(cp, tmp / f"s_{precision}.onnx", precision=precision).size_bytes
            row[f"{precision}_dense_bytes"] = export_onnx(
                cp, tmp / f"d_{precision}.onnx", precision=precision, sparse="never"
            ).size_bytes
        row["int8_ort_bytes"] = to_ort_format(tmp / "s_int8.onnx", tmp / "ort").size_bytes
        rows.append(row)
    return rows


def shapes() -> list[dict]:
    rows = []
    for nmi in [(8, 8, 8), (16, 32, 32), (32, 64, 64)]:
        prog = random_program(MachineSpec(*nmi), np.random.default_rng(2))
        for program_in in ("weights", "state"):
            for construction in ("shallow", "paper23"):
                st = compile_program(prog, construction=construction, program_in=program_in).stats()
                rows.append(
                    {
                        "nmi": nmi,
                        "program_in": program_in,
                        "construction": construction,
                        **{k: st[k] for k in ("depth", "max_width", "weights", "nonzeros", "sparsity")},
                        "mean_width": float(np.mean(st["widths"][1:])),
                    }
                )
    return rows


def markdown(speed_rows, size_rows, shape_rows, cmd: str) -> str:
    host = f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.processor() or platform.platform()}"
    L = [
        f"Command: `{cmd}`",
        f"Host: {host}; Python {platform.python_version()}; date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    L += [
        "### Steps per second (batch 1, 1 thread; Loop runs the whole budget, unrolled runs T steps per call)",
        "",
        "| (N, M, I) | construction | depth | Python interpreter | Loop fp32 | Loop int8 | unrolled fp32 | unrolled int8 | Loop fp32 / Python | Loop int8 / fp32 | unrolled fp32 / Loop fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed_rows:
        L.append(
            f"| {r['nmi']} | {r['construction']} | {r['depth']} | {r['python']:,.0f} | {r['loop_fp32']:,.0f} | {r['loop_int8']:,.0f} | "
            f"{r['unrolled_fp32']:,.0f} (T={r['unroll']}) | {r['unrolled_int8']:,.0f} | {r['loop_fp32'] / r['python']:.3g} | "
            f"{r['loop_int8'] / r['loop_fp32']:.2f} | {r['unrolled_fp32'] / r['loop_fp32']:.2f} |"
        )
    L += [
        "",
        "### File size against N, M and I (shallow, code in the weights; sparse storage = auto)",
        "",
        "| (N, M, I) | depth | max width | dense weights | nonzeros | fp32 .onnx | int8 .onnx | int8 .ort | int8 / fp32 | fp32 dense .onnx | sparse / dense (fp32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in size_rows:
        L.append(
            f"| {r['nmi']} | {r['depth']} | {r['max_width']} | {r['weights']:,} | {r['nonzeros']:,} | {r['fp32_bytes']:,} | {r['int8_bytes']:,} | {r['int8_ort_bytes']:,} | "
            f"{r['int8_bytes'] / r['fp32_bytes']:.2f} | {r['fp32_dense_bytes']:,} | {r['fp32_bytes'] / r['fp32_dense_bytes']:.3f} |"
        )
    L += [
        "",
        "### Loop file sizes in the speed runs (bytes)",
        "",
        "| (N, M, I) | construction | Loop fp32 | Loop int8 | int8 / fp32 |",
        "|---|---|---|---|---|",
    ]
    for r in speed_rows:
        L.append(
            f"| {r['nmi']} | {r['construction']} | {r['loop_fp32_bytes']:,} | {r['loop_int8_bytes']:,} | {r['loop_int8_bytes'] / r['loop_fp32_bytes']:.2f} |"
        )
    L += [
        "",
        "### Depth and width: the paper's 23-layer construction against the shallow one",
        "",
        "| (N, M, I) | code in | construction | depth | max width | mean width | dense weights | nonzeros | sparsity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in shape_rows:
        L.append(
            f"| {r['nmi']} | {r['program_in']} | {r['construction']} | {r['depth']} | {r['max_width']:,} | {r['mean_width']:,.0f} | {r['weights']:,} | {r['nonzeros']:,} | {r['sparsity']:.5f} |"
        )
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/programs.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_programs.") as d:
        tmp = Path(d)
        shape_rows = shapes()
        size_rows = sizes(tmp)
        speed_rows = speed(args.rounds, tmp)
    md = markdown(speed_rows, size_rows, shape_rows, "OMP_NUM_THREADS=1 python " + " ".join(sys.argv))
    Path(args.out).write_text(md)
    print(md)


if __name__ == "__main__":
    main()
