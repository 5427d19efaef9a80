"""The sensitivity report as a Markdown table and a plot (matplotlib, written atomically like pipeline/report.py)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_sensitivity", "sensitivity_markdown"]


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def plot_sensitivity(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Bar chart per unit: sensitivity (1 - cos_mean, log scale) and, where profiled, the fp32 latency share.

    Units kept in fp32 by ``mixed: auto`` are drawn in red. Written via a temp file + ``os.replace``.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.artifact import temp_file_near

    names = [r["unit"] for r in rows]
    xs = list(range(len(rows)))
    sens = [max(float(r["sensitivity"]), 1e-12) for r in rows]  # log scale: 0 drawn at the floor
    colors = ["tab:red" if r.get("kept_fp32") else "tab:blue" for r in rows]
    has_latency = any("latency_share" in r for r in rows)
    fig, axes = plt.subplots(
        2 if has_latency else 1, 1, figsize=(max(6.0, 0.28 * len(rows) + 2), 5.6 if has_latency else 3.2)
    )
    axes = list(axes) if has_latency else [axes]
    axes[0].bar(xs, sens, color=colors)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("1 - cos_mean")
    axes[0].set_title(title + (" (red: kept in fp32)" if any(r.get("kept_fp32") for r in rows) else ""))
    if has_latency:
        axes[1].bar(xs, [100.0 * float(r.get("latency_share") or 0.0) for r in rows], color="tab:green")
        axes[1].set_ylabel("% of fp32 kernel time")
    for ax in axes:
        ax.set_xticks(xs, names if ax is axes[-1] else [""] * len(xs), rotation=75, ha="right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_near(path)
    try:
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sensitivity_markdown(stage: str, metrics: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    """Report lines for a quantize or prune stage's sensitivity metrics.

    Args:
        stage: stage name (``quantize`` or ``prune``).
        metrics: the stage's metrics (quantize: ``targets.<name>.sensitivity`` / ``.mixed``; prune: ``sensitivity``).
        plots: target name (or ``""`` for prune) -> plot path relative to the report.
    """
    per: dict[str, Mapping[str, Any]] = {}
    if stage == "prune" and metrics.get("sensitivity"):
        per[""] = {"sensitivity": metrics["sensitivity"]}
    for name, t in (metrics.get("targets") or {}).items():
        if isinstance(t, Mapping) and t.get("sensitivity"):
            per[name] = t
    L: list[str] = []
    for name, t in per.items():
        s = t["sensitivity"]
        L += [f"### {stage} sensitivity" + (f": {name}" if name else ""), ""]
        if s.get("note"):
            L += [f"- {s['note']}", ""]
            continue
        L.append(f"- unit = {s['granularity']}; sensitivity = {s['metric']} ({s['samples']} calibration passages)")
        if s.get("uniform"):
            L.append(f"- all units ({s.get('precision')}): cos_mean {_f(s['uniform']['cos_mean'], 5)} vs dense")
        lat = s.get("latency") or {}
        if lat:
            L.append(
                f"- ORT profiler, {lat['threads']} thread(s): fp32 kernels {_f(lat['fp32_total_ms'])} ms,"
                f" quantized {_f(lat['quantized_total_ms'])} ms per passage; {_f(100 * lat['attributed_share_fp32'])} %"
                " of fp32 kernel time attributed to units (the rest: norms, attention core, glue)"
            )
        mixed = t.get("mixed")
        if mixed:
            L.append(
                f"- mixed: auto (min_cos_mean {mixed['budget']['min_cos_mean']:g}, order {mixed['order']}): kept"
                f" {len(mixed['kept_fp32'])}/{mixed['units']} units in fp32 ({_f(100 * mixed['kept_params_share'])} %"
                f" of weights): measured cos_mean {_f(mixed['cos_mean'], 5)} (uniform {_f(mixed['uniform_cos_mean'], 5)})"
            )
        L += [""]
        has_lat = any("latency_share" in r for r in s["rows"])
        head = f"| unit | {'weights removed' if stage == 'prune' else 'params'} | sensitivity | token cos min | max abs diff |"
        sep = "|---|---|---|---|---|"
        if has_lat:
            head += " fp32 ms | quantized ms | latency share |"
            sep += "---|---|---|"
        if mixed:
            head += " kept fp32 |"
            sep += "---|"
        L += [head, sep]
        for r in s["rows"]:
            line = f"| {r['unit']} | {r['params']} | {_f(r['sensitivity'])} | {_f(r['token_cos_min'], 5)} | {_f(r['max_abs_diff'])} |"
            if has_lat:
                line += f" {_f(r['fp32_ms'])} | {_f(r['quantized_ms'])} | {_f(100 * r['latency_share'])} % |"
            if mixed:
                line += f" {_f(bool(r.get('kept_fp32')))} |"
            L.append(line)
        L.append("")
        if plots.get(name):
            L += [f"![sensitivity {name}]({plots[name]})", ""]
    return L
