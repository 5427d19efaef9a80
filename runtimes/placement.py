"""Silent-fallback guard: which execution provider runs each node of a target's model, and what share of the
model (nodes, FLOPs) runs on the target's preferred (first) provider.

Two ways, chosen per target:

- ``measured``: the preferred provider is in this onnxruntime build. The session is created with the profile's
  providers and full graph optimization (as on the device), run once with ``SessionOptions.enable_profiling``;
  every node event of ORT's profile names its ``provider``. Nodes are those of the optimized graph (fusions
  included), so counts differ from the exported graph's.
- ``static``: the provider is not here. The exported graph is checked node by node against the provider's
  documented operator list (:mod:`targets.providers`, an approximation of the documented list; ``max_rank``
  checked from real shapes). ``unknown`` when no list ships for it.

Shapes for FLOPs and rank checks come from the profile's node events (``input_type_shape`` /
``output_type_shape``): for ``static``, of one CPU run with graph optimization disabled, so the nodes are the
exported graph's own. FLOPs are
counted for MatMul-like ops (MatMul, Gemm, MatMulInteger, MatMulIntegerToFloat, QLinearMatMul, DynamicQuantizeMatMul, FusedMatMul,
MatMulNBits, QGemm), Conv/ConvInteger/QLinearConv and attention ops (Attention, MultiHeadAttention,
GroupQueryAttention): ``2 x MACs``; other ops count in the node share only.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CPU", "coverage_failure", "node_flops", "provider_coverage"]

CPU = "CPUExecutionProvider"
_MATMUL_LIKE = {
    "MatMul",
    "Gemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "FusedMatMul",
    "MatMulNBits",
    "QGemm",
}
_CONV_LIKE = {"Conv", "ConvInteger", "QLinearConv", "NhwcConv", "FusedConv"}
_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}
_SUFFIX = "_kernel_time"


def _shapes(entries: Sequence[Mapping[str, Any]] | None) -> list[list[int]]:
    """ORT profile ``input_type_shape`` entries (``[{"float": [1, 32, 384]}, ...]``) -> shapes."""
    return [list(next(iter(e.values()))) if e else [] for e in entries or []]


def node_flops(op_type: str, inputs: list[list[int]], outputs: list[list[int]]) -> int:
    """FLOPs (2 x multiply-adds) of one node from its real shapes; 0 for ops not counted (see module docstring).

    MatMul-like: ``2 * prod(output) * K`` with K the last dim of the first input. Conv: ``2 * prod(output) *
    prod(W.shape[1:])``. Attention with separate Q, K, V (``(B, S, H*D)`` or ``(B, H, S, D)``): ``4 * prod(Q) *
    S_kv`` (scores and weighted sum)."""
    if not outputs or not outputs[0] or not inputs or not inputs[0]:
        return 0
    out = math.prod(outputs[0])
    if op_type in _MATMUL_LIKE:
        if op_type == "Gemm" and len(inputs[0]) >= 2:  # (M, N) out; K from A's shape, whichever side transA put it on
            k = inputs[0][0] if inputs[0][0] * outputs[0][-1] != out else inputs[0][1]
        else:
            k = inputs[0][-1]
        return 2 * out * int(k)
    if op_type in _CONV_LIKE and len(inputs) > 1:
        w = inputs[3] if op_type == "QLinearConv" and len(inputs) > 3 else inputs[1]
        return 2 * out * math.prod(w[1:]) if len(w) > 1 else 0
    if op_type in _ATTENTION and len(inputs) > 1 and inputs[1]:
        q, kv = inputs[0], inputs[1]
        s_kv = kv[-2] if len(kv) == 4 else (kv[1] if len(kv) == 3 else 0)
        return 4 * math.prod(q) * int(s_kv)
    return 0


def _profile_run(
    model_path: Path, feeds: Mapping[str, np.ndarray], providers: Sequence[str], *, optimize: bool, threads: int
) -> list[dict[str, Any]]:
    """One profiled run; the node events (``name``, ``op``, ``provider``, ``inputs``, ``outputs``, ``index``)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgepipe-placement-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=list(providers))
        declared = {i.name for i in sess.get_inputs()}
        sess.run(None, {k: v for k, v in feeds.items() if k in declared})
        events = json.loads(Path(sess.end_profiling()).read_text())
    seen: dict[str, dict[str, Any]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith(_SUFFIX):
            continue
        args = e.get("args", {})
        key = f"{args.get('node_index', '')}:{name}"
        seen.setdefault(
            key,
            {
                "name": name[: -len(_SUFFIX)],
                "op": args.get("op_name", ""),
                "provider": args.get("provider", ""),
                "inputs": _shapes(args.get("input_type_shape")),
                "outputs": _shapes(args.get("output_type_shape")),
                "index": int(args["node_index"]) if str(args.get("node_index", "")).isdigit() else -1,
            },
        )
    return sorted(seen.values(), key=lambda r: r["index"])


def _graph_nodes(model_path: Path) -> list[tuple[str, str, str]]:
    """(name, domain, op_type) of the exported graph's nodes, Constant nodes left out (every runtime folds them
    into initializers)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [(n.name, n.domain or "ai.onnx", n.op_type) for n in model.graph.node if n.op_type != "Constant"]


def _shape_lookup(graph: list[tuple[str, str, str]], events: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The unoptimized run's event for each graph node: by unique name, else the n-th node of that op type."""
    by_name = Counter(n for n, _, _ in graph)
    named = {e["name"]: e for e in events}
    per_op: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        per_op.setdefault(e["op"], []).append(e)
    used: Counter[str] = Counter()
    out: list[dict[str, Any] | None] = []
    for name, _, op in graph:
        if name and by_name[name] == 1 and name in named:
            out.append(named[name])
            continue
        pool = per_op.get(op, [])
        out.append(pool[used[op]] if used[op] < len(pool) else None)
        used[op] += 1
    return out


def _summary(provider: str, method: str, rows: list[dict[str, Any]], source: str | None) -> dict[str, Any]:
    n = len(rows)
    on = sum(1 for r in rows if r["provider"] == provider)
    flops = sum(r["flops"] for r in rows)
    flops_on = sum(r["flops"] for r in rows if r["provider"] == provider)
    unsupported = Counter(r["op"] for r in rows if r["provider"] != provider)
    return {
        "provider": provider,
        "method": method,
        "source": source,
        "nodes": n,
        "nodes_on_provider": on,
        "node_share": round(on / n, 4) if n else None,
        "flops": flops,
        "flops_on_provider": flops_on,
        "flop_share": round(flops_on / flops, 4) if flops else None,
        "unsupported": dict(unsupported.most_common()),
        "flops_counted_for": "MatMul/Gemm/Conv/Attention-like ops; others count in the node share only",
    }


def provider_coverage(
    model_path: Path, feeds: Mapping[str, np.ndarray], providers: Sequence[str], *, threads: int = 1
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Share of the model on ``providers[0]`` and every node's provider.

    Args:
        model_path: the target's ``.onnx`` model.
        feeds: one real batch (shapes decide FLOPs and rank limits).
        providers: the profile's providers, preferred first.
        threads: intra-op threads for the profiled runs.

    Returns:
        (summary, placement): the summary has ``provider``, ``method`` (``measured`` / ``static`` / ``unknown``),
        ``source``, ``nodes``, ``nodes_on_provider``, ``node_share``, ``flops``, ``flops_on_provider``,
        ``flop_share`` (None without counted FLOPs), ``unsupported`` (op type -> nodes off the provider);
        placement is one ``{"name", "op", "provider", "flops"}`` row per node (plus ``"why"`` when static).

    Raises:
        TargetError: a shipped provider list is invalid.
    """
    import onnxruntime as ort

    from targets.providers import provider_ops

    preferred = providers[0]
    if preferred == CPU or preferred in ort.get_available_providers():
        chosen = [p for p in dict.fromkeys(providers) if p in ort.get_available_providers()]
        events = _profile_run(model_path, feeds, chosen, optimize=True, threads=threads)
        rows = [
            {
                "name": e["name"],
                "op": e["op"],
                "provider": e["provider"],
                "flops": node_flops(e["op"], e["inputs"], e["outputs"]),
            }
            for e in events
        ]
        return _summary(preferred, "measured", rows, "ONNX Runtime profiling (optimized graph)"), rows
    graph = _graph_nodes(model_path)
    shaped = _profile_run(model_path, feeds, [CPU], optimize=False, threads=threads)  # the exported graph's shapes
    lookup = _shape_lookup(graph, shaped)
    doc = provider_ops(preferred)
    rows = []
    for (name, domain, op), ev in zip(graph, lookup):
        ins, outs = (ev["inputs"], ev["outputs"]) if ev else ([], [])
        row = {"name": name, "op": op, "provider": CPU, "flops": node_flops(op, ins, outs)}
        if doc is None:
            row["why"] = "no documented op list"
        else:
            rule = doc.rule(domain, op)
            if rule is None:
                row["why"] = f"{domain}:{op} not in the documented list"
            elif rule.max_rank is not None and ev is not None and any(len(s) > rule.max_rank for s in ins if s):
                row["why"] = f"input rank {max(len(s) for s in ins if s)} > {rule.max_rank} ({rule.note})"
            else:
                row["provider"] = preferred
        rows.append(row)
    if doc is None:
        summary = _summary(preferred, "unknown", rows, None)
        summary.update(node_share=None, flop_share=None, unsupported={})
        return summary, rows
    return _summary(preferred, "static", rows, doc.source), rows


def coverage_failure(target: str, profile: Any, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """A report failure row when the share on the preferred provider is below ``min_provider_coverage``."""
    need = getattr(profile, "min_provider_coverage", None)
    if need is None:
        return None
    by = getattr(profile, "provider_coverage_by", "nodes")
    share = summary.get("node_share" if by == "nodes" else "flop_share")
    label = "node share" if by == "nodes" else "FLOP share"
    ops = ", ".join(f"{op}×{n}" for op, n in (summary.get("unsupported") or {}).items())
    where = f"{summary['provider']} ({summary['method']})"
    if share is None:
        why = (
            "no documented op list ships for it and it is not in this onnxruntime"
            if summary["method"] == "unknown"
            else "no FLOPs counted"
        )
        return {
            "target": target,
            "check": "provider_coverage",
            "value": f"{label} on {where} unknown: {why}",
            "limit": f"min_provider_coverage {need:g}",
        }
    if share >= need:
        return None
    return {
        "target": target,
        "check": "provider_coverage",
        "value": f"{label} {share:.3f} on {where}; unsupported: {ops or 'none'}",
        "limit": f"min_provider_coverage {need:g}",
    }
