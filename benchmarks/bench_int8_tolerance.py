"""int8 parity spread across CPUs, and the profile tolerances derived from it (issue 16 item 6).

For every int8 / int8-static target of the given run folders this collects the per-token parity against the
PyTorch fp32 reference (max abs diff, per-token cosine minimum over valid positions):

- ``validate``: this host, all held-out passages (report.json ``targets.<t>.parity``);
- ``host``: the target's bundle (first held-out batch) on this host;
- ``avx2``: the same bundle under ``qemu-x86_64-static -cpu Haswell`` (AVX2 without AVX-VNNI: ORT's u8 x s8
  kernel with saturating int16 pair sums), the CPU a CI runner may have;
- ``aarch64``: the bundle on aarch64 kernels (report.json ``arm64_check``, written by ``make arm64-check``),
  and the host-vs-aarch64 difference.

and prints a markdown table plus the tolerance the rule gives: ``min_cosine = 1 - margin * max(1 - cos_min)``
rounded down to 0.01, ``atol = margin * max(max_abs_diff)`` rounded up to 0.1 (margin 2 by default).

    python benchmarks/bench_int8_tolerance.py runs/demo /tmp/tiny-run [--margin 2] [--no-avx2]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _bundle_result(bundle: Path, prefix: list[str]) -> dict | None:
    proc = subprocess.run(
        [*prefix, sys.executable, "evaluate.py", "--runs", "1", "--warmup", "0", "--threads", "1"],
        cwd=bundle,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def _flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    have = [f for f in ("avx2", "avx512_vnni", "avx_vnni") if f" {f}" in text]
    return f"{platform.machine()} ({', '.join(have) or 'no avx2'})"


def collect(run: Path, avx2: bool) -> list[dict]:
    report = json.loads((run / "report.json").read_text())
    arm = report.get("arm64_check", {}).get("targets", {})
    qemu = shutil.which("qemu-x86_64-static") if avx2 else None
    rows = []
    for name, t in report["targets"].items():
        if not str(t.get("precision", "")).startswith("int8"):
            continue
        row = {"run": run.name, "target": name, "precision": t["precision"], "validate": t.get("parity")}
        bundle = run / name / "bundle"
        if bundle.is_dir():
            row["host"] = _bundle_result(bundle, [])
            if qemu:
                row["avx2"] = _bundle_result(bundle, [qemu, "-cpu", "Haswell"])
        if name in arm:
            row["aarch64"] = arm[name].get("vs_reference")
            row["host_vs_aarch64"] = arm[name].get("host_vs_aarch64")
        rows.append(row)
    return rows


def _cell(d: dict | None) -> str:
    if not d or d.get("max_abs_diff") is None:
        return "–"
    return f"{d['max_abs_diff']:.3g} / {d['cosine_min']:.4f}"


def derive(rows: list[dict], precision: str, margin: float) -> dict:
    """The tolerance the rule gives over every measurement of ``precision`` (None when there is none)."""
    cos, mad = [], []
    for r in rows:
        if r["precision"] != precision:
            continue
        for key in ("validate", "host", "avx2", "aarch64"):
            d = r.get(key)
            if d and d.get("cosine_min") is not None:
                cos.append(d["cosine_min"])
                mad.append(d["max_abs_diff"])
    if not cos:
        return {}
    worst_cos, worst_abs = min(cos), max(mad)
    return {
        "worst_cosine_min": worst_cos,
        "worst_max_abs_diff": worst_abs,
        "min_cosine": math.floor((1 - margin * (1 - worst_cos)) * 100) / 100,
        "atol": math.ceil(margin * worst_abs * 10) / 10,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders (with int8 targets and bundles)")
    ap.add_argument("--margin", type=float, default=2.0, help="tolerance = margin x worst measured error")
    ap.add_argument("--no-avx2", action="store_true", help="skip the AVX2-without-VNNI emulation")
    ap.add_argument("--json", type=Path, help="also write the rows and the derivation here")
    args = ap.parse_args()
    rows = [r for run in args.runs for r in collect(run, not args.no_avx2)]
    print(f"host: {_flags()}; cells: max abs diff / per-token cosine min vs the PyTorch fp32 reference\n")
    print(
        "| run | target | precision | validate (all held-out) | bundle, host | bundle, AVX2 no VNNI (qemu) |"
        " bundle, aarch64 (qemu) | host vs aarch64 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['target']} | {r['precision']} | {_cell(r.get('validate'))} | {_cell(r.get('host'))}"
            f" | {_cell(r.get('avx2'))} | {_cell(r.get('aarch64'))} | {_cell(r.get('host_vs_aarch64'))} |"
        )
    derived = {p: derive(rows, p, args.margin) for p in sorted({r["precision"] for r in rows})}
    print()
    for p, d in derived.items():
        if d:
            print(
                f"{p}: worst cos_min {d['worst_cosine_min']:.4f}, worst max abs {d['worst_max_abs_diff']:.3g}"
                f" -> margin {args.margin:g}: min_cosine {d['min_cosine']:.2f}, atol {d['atol']:.1f}"
            )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "derived": derived, "host": _flags()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
