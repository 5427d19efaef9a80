"""Per-target metrics a tune can minimise, maximise or constrain, read from a run's ``report.json`` target entry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["METRICS", "target_metrics"]


def _fid(name: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda t: (t.get("fidelity") or {}).get(name)


# name -> extractor from report.json["targets"][target]; the registry of allowed objective/constraint names
METRICS: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
    "latency_ms": lambda t: (t.get("latency_ms") or {}).get("p50"),  # benchmark p50, ms
    "latency_p95_ms": lambda t: (t.get("latency_ms") or {}).get("p95"),
    "size_mb": lambda t: t["size_bytes"] / 1e6 if t.get("size_bytes") is not None else None,
    "peak_rss_mb": lambda t: t.get("peak_rss_mb"),
    "cos_mean": _fid("cos_mean"),
    "cos_min": _fid("cos_min"),
    "recall_at_10": _fid("recall_at_10"),
    "top1_agreement": _fid("top1_agreement"),
    "ppl_ratio": _fid("ppl_ratio"),
}


def target_metrics(entry: Mapping[str, Any]) -> dict[str, float | None]:
    """Every registered metric of one target's report entry (None where the run did not measure it)."""
    out: dict[str, float | None] = {}
    for name, fn in METRICS.items():
        v = fn(entry)
        out[name] = None if v is None else float(v)
    return out
