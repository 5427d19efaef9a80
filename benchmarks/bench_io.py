"""Counted I/O (words moved between slow memory and a fast memory of M words, per head) divided by
the lower bound, for every attention algorithm of ``pipeline.kernels.io_model``, in both regimes.

Lower bounds use constant 1 (the notes give Theta only): forward min{n^2 d^2/M, n^2 d/sqrt(M)},
backward min{(n^2 d^2 + n d^3)/M, (n^2 d + n d^2)/sqrt(M)}.

Usage:
    python benchmarks/bench_io.py [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.kernels import io_model as io
from pipeline.kernels.planner import plan_attention

NS = [1024, 4096, 16384]
DS = [64, 128]
REGIMES = {"M = 16 d^2 (large)": 16.0, "M = d^2": 1.0, "M = d^2/8 (small)": 1 / 8}


def _crossover(fa, n: int, d: int) -> float:
    for k in range(-48, 49):
        m = int(d * d * 2 ** (k / 8))
        try:
            if fa(n, d, m) <= io.small_cache_forward_formula(n, d, m):
                return m / (d * d)
        except ValueError:
            continue
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "io.md"))
    args = ap.parse_args()
    lines = [
        "# I/O accounting: counted words / lower bound",
        "",
        "Command: `python benchmarks/bench_io.py`",
        f"Host: `{' '.join(platform.uname())}`, nproc={os.cpu_count()}",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "Note: pure counting (no timing), so the other agents loading the machine do not affect these numbers.",
        "Counts are exact walks over the kernels' tiles (tests assert walk == closed form). Lower bounds: constant 1 (notes give Theta only).",
        "Columns: fwd ratios = count / lower_bound_forward; bwd ratios = count / lower_bound_backward. `plan` = planner's choice (forward) and its ratio.",
        "",
        "| regime | n | d | M | FA1 fwd | FA2 fwd | small-cache fwd | standard fwd | FA1 bwd | FA2 bwd | small-cache bwd | standard bwd | plan |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in REGIMES.items():
        for d in DS:
            m = int(c * d * d)
            for n in NS:
                lf, lb = io.lower_bound_forward(n, d, m), io.lower_bound_backward(n, d, m)

                def r(fn, bound, *a):
                    try:
                        return f"{fn(*a) / bound:.2f}"
                    except ValueError:
                        return "no tile fits"

                def std(fn, bound, n=n, d=d, m=m):
                    # the textbook count keeps a K/V matrix and a score row on chip: only valid if that fits
                    peak = io.standard_forward_io(n, d).peak_fast_words
                    return f"{fn(n, d) / bound:.2f}" if peak <= m else f"n/a (needs M >= {peak})"

                p = plan_attention(cache_words=m, seq=n, head_dim=d)
                lines.append(
                    f"| {name} | {n} | {d} | {m} | {r(io.fa1_forward_formula, lf, n, d, m)} | {r(io.fa2_forward_formula, lf, n, d, m)} | "
                    f"{r(io.small_cache_forward_formula, lf, n, d, m)} | {std(io.standard_forward_formula, lf)} | "
                    f"{r(io.fa1_backward_formula, lb, n, d, m)} | {r(io.fa2_backward_formula, lb, n, d, m)} | "
                    f"{r(io.small_cache_backward_formula, lb, n, d, m)} | {std(io.standard_backward_formula, lb)} | "
                    f"{p.algorithm} {p.ratio:.2f} |"
                )
    lines += [
        "",
        "## Crossover (forward): smallest M on a 2^(1/8) grid where the FA count <= the small-cache count, n = 4096",
        "",
        "| d | FA1 vs small-cache (M/d^2) | FA2 vs small-cache (M/d^2) |",
        "|---|---|---|",
    ]
    for d in (32, 64, 128, 256):
        lines.append(
            f"| {d} | {_crossover(io.fa1_forward_formula, 4096, d):.2f} | {_crossover(io.fa2_forward_formula, 4096, d):.2f} |"
        )
    lines += [
        "",
        "## Block-sparse FA2 forward (b from the planner, density s of kept blocks), M = 16 d^2, d = 64",
        "",
        "| n | s | b | count / dense FA2 count | count / (s * dense forward bound) |",
        "|---|---|---|---|---|",
    ]
    d = 64
    m = 16 * d * d
    for n in (4096, 16384):
        for s in (0.1, 0.25, 0.5):
            p = plan_attention(cache_words=m, seq=n, head_dim=d, density=s)
            dense = io.block_sparse_forward_formula(n, d, p.block_q, (-(-n // p.block_q)) ** 2)
            lines.append(
                f"| {n} | {s} | {p.block_q} | {p.predicted_io_words / dense:.3f} | {p.predicted_io_words / (s * io.lower_bound_forward(n, d, m)):.2f} |"
            )
    lines += [
        "",
        "## Why no ratio reaches the 1.1 goal",
        "",
        "The bounds are Theta() statements with unknown constants; taking the constant as 1 gives a bound that no",
        "algorithm of these loop structures can reach. Structural minima (from the footprint constraints):",
        "FA2 forward keeps Q_i and O_acc resident, so B_r <= (M - 2d)/(2d + 3) and K, V are re-read T_r = ceil(n/B_r) times, on top",
        "of reading Q and writing O once: >= 2nd (1 + T_r) + n words, which tends to 4 n^2 d^2/M (ratio -> 4) only when n >> M/d.",
        "At n = 4096, d = 64, M = 16 d^2 (raspberry-pi-5's L2) the footprint caps B_r at 1007, so T_r >= 5 and every FA2 tiling",
        "is >= 6.0x the bound: the planner's 6.0 there is the exact minimum (tests compare it with an exhaustive search over",
        "every fitting (B_r, B_c)); at n = 16384 the same rule gives 4.5. FA2 backward keeps K_j, V_j, dK_j, dV_j resident (B_c <= M/(4d))",
        "and moves 4nd words per key block: >= 16 n^2 d^2/M (ratio >= 16; the default rule B_r = min(d, M/16d) gives ~30).",
        "Tiled GEMM with b = sqrt(M/3): each n^2 d GEMM costs 2 sqrt(3) n^2 d/sqrt(M), so the forward (2 GEMMs) is >= 6.93 and the",
        "backward (5 GEMMs) >= 17.3, plus O(n^2) softmax/elementwise passes. What the theory predicts and the table shows is that",
        "each ratio is flat (Theta(1)) in n, d and M inside the regime where the algorithm is optimal, and that FA's ratio grows",
        "like d/sqrt(M) below M ~ d^2 while the tiled algorithm's stays flat. The standard algorithm's textbook count is only valid",
        "when its working set (nd + n + d words) fits, hence n/a where it does not.",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
