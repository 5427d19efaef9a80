"""Time and peak-memory of the flash kernel vs naive (materialised S, P) attention on CPU.

Each (kernel, n) case runs in a fresh subprocess; memory is the peak-RSS increase over the RSS
just before the call (``resource.getrusage(...).ru_maxrss`` minus ``/proc/self/statm``), so the
inputs and the interpreter are not counted. Forward only, B=1, H=6, D=64, float32, no grad.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_kernels_torch.py [--ns 1024 2048 ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

B, H, D = 1, 6, 64
NAIVE_LIMIT_BYTES = 4 * 2**30  # naive holds S and P: 2 * H * n^2 * 4 bytes; skipped above 4 GiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _case(kernel: str, n: int, reps: int) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pipeline.kernels import attention

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))

    def run():
        with torch.no_grad():
            if kernel == "naive":  # standard attention: S and P materialised (B, H, n, n)
                s = torch.matmul(q, k.transpose(-1, -2)) * D**-0.5
                return torch.matmul(torch.softmax(s, dim=-1), v)
            if kernel == "sdpa":
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return attention(q, k, v, kernel=kernel)

    base = _rss_bytes()
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [first]
    for _ in range(reps - 1):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {
        "kernel": kernel,
        "n": n,
        "seconds": sorted(times)[len(times) // 2],
        "reps": reps,
        "peak_delta_mib": max(0, peak - base) / 2**20,
        "out_mib": out.numel() * 4 / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--kernels", nargs="+", default=["flash", "sdpa", "naive"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels_torch.md"))
    ap.add_argument("--case", nargs=2, metavar=("KERNEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kernel, n = args.case[0], int(args.case[1])
        print(json.dumps(_case(kernel, n, reps=3 if n <= 4096 else 1)))
        return
    rows = []
    for n in args.ns:
        for kernel in args.kernels:
            if kernel == "naive" and 2 * H * n * n * 4 > NAIVE_LIMIT_BYTES:
                rows.append({"kernel": kernel, "n": n, "skipped": f"S and P need {2 * H * n * n * 4 / 2**30:.1f} GiB"})
                continue
            res = subprocess.run(
                [sys.executable, __file__, "--case", kernel, str(n)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [
        "# Kernel benchmark (CPU, PyTorch): flash vs naive attention",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_kernels_torch.py --ns {' '.join(map(str, args.ns))}`",
        f"Host: `{' '.join(platform.uname())}`, nproc={os.cpu_count()}, torch threads=1",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "Note: the machine (2 cores) was shared with other agents running builds/tests; timings are noisy, compare ratios within a row.",
        f"Shape: B={B}, H={H}, D={D}, float32, forward only, no grad. flash uses the default M = 131072 words (blocks from `fa2_forward_blocks`).",
        "Memory: peak-RSS increase over the RSS before the call, fresh subprocess per case (inputs not counted; output is 1.5 MiB * n/1024).",
        "",
        "| n | flash s | sdpa s | naive s | naive/flash time | flash peak MiB | sdpa peak MiB | naive peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in args.ns:
        by = {r["kernel"]: r for r in rows if r["n"] == n}

        def cell(kern, key, fmt, by=by):
            r = by.get(kern)
            if r is None:
                return "-"
            if "skipped" in r:
                return f"skipped ({r['skipped']})" if key == "seconds" else "-"
            return fmt.format(r[key])

        ratio = "-"
        if "flash" in by and "naive" in by and "skipped" not in by["naive"]:
            ratio = f"{by['naive']['seconds'] / by['flash']['seconds']:.2f}"
        lines.append(
            f"| {n} | {cell('flash', 'seconds', '{:.3f}')} | {cell('sdpa', 'seconds', '{:.3f}')} | {cell('naive', 'seconds', '{:.3f}')} | {ratio} | "
            f"{cell('flash', 'peak_delta_mib', '{:.0f}')} | {cell('sdpa', 'peak_delta_mib', '{:.0f}')} | {cell('naive', 'peak_delta_mib', '{:.0f}')} |"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
