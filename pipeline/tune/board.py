"""Devices in the loop: benchmark a target's bundle on a board that joined the Ray cluster.

A board advertises a custom resource named after its target profile with a count of 1, e.g.
``ray start --address HEAD:6379 --resources '{"raspberry-pi-5": 1}'``. A trial asks for that resource for its
benchmark task only, so Ray schedules it on the board and never runs two benchmarks there at once, while
pruning, export and quantization stay on ordinary CPU workers. The bundle travels as bytes (no shared file
system needed on the board) and runs with the board's own Python: only numpy and onnxruntime are needed.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["BoardBench", "bench_bundle_dir", "board_targets"]


def board_targets(names: list[str]) -> list[str]:
    """Targets of this tune for which the connected Ray cluster has a resource of the same name."""
    import ray

    have = ray.cluster_resources()
    return [n for n in names if have.get(n, 0) >= 1]


def bench_bundle_dir(run_dir: Path, report: Mapping[str, Any], target: str) -> Path | None:
    """The benchmark stage's bundle for ``target`` (its input length), else the validate bundle."""
    for s in report.get("stages", []):
        if s["name"] == "benchmark":
            p = run_dir / s["folder"] / target
            if (p / "evaluate.py").is_file():
                return p
    p = run_dir / target / "bundle"
    return p if (p / "evaluate.py").is_file() else None


def _pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False)
    return buf.getvalue()


def _run_packed(blob: bytes, runs: int, threads: int) -> dict[str, Any]:
    """Executed on the board: unpack into a temp folder, run evaluate.py with this Python, return its JSON."""
    import platform
    import socket
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as d:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            tar.extractall(d, filter="data")  # refuses absolute paths, links out of the folder
        r = subprocess.run(
            [sys.executable, "evaluate.py", "--runs", str(runs), "--threads", str(threads)],
            cwd=d,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode not in (0, 1) or not lines:
            raise RuntimeError(
                f"evaluate.py on {socket.gethostname()} exited {r.returncode}: {r.stderr.strip()[-300:]}"
            )
        out = json.loads(lines[-1])
    import ray

    out["node"] = (
        f"{socket.gethostname()} ({platform.machine()}, ray node {ray.get_runtime_context().get_node_id()[:12]})"
    )
    return out


class BoardBench:
    """Re-measure latency and peak RSS of each target that has a board in the cluster (one at a time per board)."""

    def __init__(self, targets: list[str], runs: int, threads: Mapping[str, int]) -> None:
        self.targets = targets
        self.runs = runs
        self.threads = dict(threads)

    def __call__(self, run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
        import ray
        from ray import cloudpickle

        # ship _run_packed by value: the board has Ray, numpy and onnxruntime, not edgepipe
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        remote = ray.remote(_run_packed)
        for name in self.targets:
            entry = (report.get("targets") or {}).get(name)
            bundle = bench_bundle_dir(run_dir, report, name)
            if entry is None or bundle is None:
                continue
            res = ray.get(
                remote.options(resources={name: 1}, num_cpus=0).remote(
                    _pack(bundle), self.runs, self.threads.get(name, 1)
                )
            )
            entry.update(
                {
                    "latency_ms": res["latency_ms"],
                    "peak_rss_mb": res["peak_rss_mb"],
                    "measured_on": f"board {res['node']}",
                }
            )
        return report
