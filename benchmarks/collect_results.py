"""Assemble benchmarks/RESULTS.md from the per-benchmark fragments in benchmarks/results/.

Each benchmark script writes its own fragment (command, host, date, table); this keeps RESULTS.md one
readable page in a fixed order. Usage: python benchmarks/collect_results.py
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    ("quantization.md", "Issue 2 — peer path vs edgepipe per precision (MiniLM)"),
    ("pruning.md", "Issue 3 — pruning methods × sparsity × model"),
    ("prune_qk_probe.md", "Issue 3 — q/k-only attention-approximation probe (defaults chosen from this)"),
    ("small_gpt.md", "Issue 3 — small GPT trained on fortunes (perplexity model)"),
    ("kernels_torch.md", "Issue 4 — PyTorch kernels: flash vs naive, time and memory"),
    ("sparse_ort.md", "Issue 4 — ONNX Runtime block-sparse attention vs dense fused attention"),
    ("sparse_e2e.md", "Issue 4 — 2-layer Llama end to end, block-sparse vs dense"),
    ("io.md", "Issue 4 — counted I/O vs lower bounds"),
    (
        "models_brought.md",
        "Issue 11 — models people bring: int8 against the peer, int8 weight types per CPU, external data",
    ),
    (
        "embedding_int8_memory.md",
        "Issue 11 follow-up — int8 embedding tables quantized in chunks: quantize peak memory",
    ),
    (
        "gradients.md",
        "Issue 13 — verify_gradient: almost-linear attention gradients, tensor attention, bounded entries",
    ),
    ("int4.md", "Issue 16 — int4 weight-only (MatMulNBits) vs int8 dynamic on the small GPT"),
    ("tune.md", "Issue 15 — edgepipe tune: MiniLM at 45 minutes and at a reduced budget (goal missed), tiny-model run"),
    (
        "memory.md",
        "Issue 16 — memory budget (measured vs estimated) and provider coverage per documented provider (MiniLM)",
    ),
    (
        "int8_tolerance.md",
        "Issue 16 — int8 parity across CPUs (host, AVX2 without VNNI, aarch64) and derived tolerances",
    ),
    ("programs.md", "Issue 17 — compiled SUBLEQ programs: looped ReLU-MLP in ONNX Runtime"),
    (
        "mixed_precision.md",
        "Issue 16 — per-layer sensitivity and mixed precision (`mixed: auto`) vs uniform int8 (MiniLM)",
    ),
    ("diffusion.md", "Issue 18 — GMM score network: dense vs pruned vs quantized (verify_diffusion)"),
    (
        "privacy_summary.md",
        "Issue 14 — DP cross-attention: utility vs privacy, summary (hand-written from the map below)",
    ),
    ("privacy.md", "Issue 14 — DP cross-attention: the utility vs privacy map (`benchmarks/bench_privacy.py`)"),
]


def main() -> None:
    parts = [
        "# Benchmark results",
        "",
        "Each section is written by the benchmark script named in it (command, host, date and numbers).",
        "This 2-core machine is shared: absolute times are noisy; ratios measured in one process are the result.",
        "",
    ]
    seen = set()
    for name, title in ORDER:
        p = HERE / "results" / name
        if p.exists():
            parts += [
                f"## {title}",
                "",
                f"*(from `benchmarks/results/{name}`)*",
                "",
                p.read_text().strip().replace("\n# ", "\n### "),
                "",
            ]
            seen.add(name)
    for p in sorted((HERE / "results").glob("*.md")):
        if p.name not in seen:
            parts += [f"## {p.stem}", "", p.read_text().strip(), ""]
    out = HERE / "RESULTS.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
