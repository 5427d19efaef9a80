"""Per-node latency from ONNX Runtime's own profiler, and its attribution to named groups of nodes.

``SessionOptions.enable_profiling`` makes ORT write one JSON trace (Chrome trace format) per session: one
``Session``/``model_run`` event per ``run`` call and one ``Node`` event ``<node name>_kernel_time`` per kernel
executed, with durations in microseconds. Warm-up runs are dropped by keeping only the kernel events inside
the later ``model_run`` intervals; each node's time is the minimum over the repeats of a feed (contention only adds).

ORT's graph optimizer renames what it fuses: a fused node usually keeps the name of the node it grew from plus
a suffix (``n16_MatMul_quant`` for the int8 form of ``n16_MatMul``, ``n40_MatMul/MatMulScaleFusion/``), which
is why :func:`attribute` matches a node and every name that extends it after ``_`` or ``/``. Fusions that take
a fresh name (``SkipLayerNormalization_token_4``) stay unattributed and are counted in the total only.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NodeProfile", "attribute", "profile_nodes"]


@dataclass(frozen=True)
class NodeProfile:
    """Kernel time per node, averaged over the measured runs.

    Attributes:
        node_ms: ORT node name (after ORT's graph optimization) -> milliseconds per ``run`` call (minimum over
            the repeats of each feed, mean over feeds).
        total_ms: sum of ``node_ms`` (kernel time only: no session overhead between kernels).
        runs: measured ``run`` calls (warm-up excluded).
    """

    node_ms: dict[str, float]
    total_ms: float
    runs: int


def profile_nodes(
    model_path: Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    runs: int = 3,
    warmup: int = 1,
    threads: int = 1,
    work_dir: Path | None = None,
) -> NodeProfile:
    """Run ``model_path`` on every feed ``warmup + runs`` times under ORT's profiler (CPU provider).

    Args:
        model_path: an ``.onnx`` file.
        feeds: ``name -> array`` dicts, each passed to ``InferenceSession.run``.
        runs: measured passes over ``feeds``; warmup: unmeasured passes before them.
        threads: ``intra_op_num_threads``.
        work_dir: folder for ORT's trace file (a private temp folder inside it, removed afterwards);
            None = the system temp folder.

    Returns:
        A :class:`NodeProfile` (milliseconds per pass over one feed, averaged over ``runs * len(feeds)`` calls).

    Raises:
        ValueError: ``runs < 1`` or no feeds.
    """
    import onnxruntime as ort

    if runs < 1 or not feeds:
        raise ValueError(f"profile_nodes needs runs >= 1 and at least one feed (runs={runs}, feeds={len(feeds)})")
    with tempfile.TemporaryDirectory(prefix=".ort-profile-", dir=work_dir) as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        for _ in range(warmup + runs):
            for f in feeds:
                sess.run(None, {k: v for k, v in f.items() if k in names})
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    measured = model_runs[warmup * len(feeds) :]  # (start, end) in µs of each measured run call
    starts = np.array([s for s, _ in measured], dtype=np.int64)
    ends = np.array([e for _, e in measured], dtype=np.int64)
    per_call: dict[str, np.ndarray] = {}  # node -> ms in each measured run call
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1  # the run call this kernel started in
        if i >= 0 and e["ts"] <= ends[i]:
            key = name[: -len("_kernel_time")]
            per_call.setdefault(key, np.zeros(len(measured)))[i] += e["dur"] / 1000.0
    # minimum over repeats of the same feed, then mean over feeds: contention only ever adds time (a kernel
    # descheduled on a shared machine reads 10-100x slower, even in 2 of 3 repeats), so the minimum is the
    # kernel's own cost
    n_feeds = len(feeds)
    complete = len(measured) == runs * n_feeds  # ORT wrote one model_run event per call (its buffer did not fill)
    node_ms = {
        k: float(np.mean(np.min(v.reshape(runs, n_feeds), axis=0)) if complete else np.mean(v))
        for k, v in per_call.items()
    }
    return NodeProfile(node_ms=node_ms, total_ms=float(sum(node_ms.values())), runs=len(measured))


def _extends(name: str, node: str) -> bool:
    return name == node or (name.startswith(node) and name[len(node)] in "_/")


def attribute(profile: NodeProfile, groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Milliseconds per group: ``groups`` maps a label to the source-graph node names it owns.

    A profiled node counts for a group when its name is one of the group's node names or extends one after
    ``_`` or ``/`` (ORT's fused/quantized forms). A profiled node claimed by two groups counts for the one
    with the longest matching node name.

    Returns:
        label -> ms per run (0.0 for a group none of whose nodes ran under a recognisable name).
    """
    by_node = sorted(((node, label) for label, nodes in groups.items() for node in nodes), key=lambda t: -len(t[0]))
    out = dict.fromkeys(groups, 0.0)
    for pname, ms in profile.node_ms.items():
        for node, label in by_node:  # longest node name first: n16_MatMul before n1_...
            if _extends(pname, node):
                out[label] += ms
                break
    return out
