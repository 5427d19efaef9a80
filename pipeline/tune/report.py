"""Tune output: Pareto set per target, reference runs (dense, peer), report.md/json, plots, best-<target>.yaml."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifact import atomic_write_json, atomic_write_text
from pipeline.errors import EdgepipeError, ValidationFailed
from pipeline.tune.spec import TuneSpec, apply_params
from pipeline.tune.trial import Layout, summarize_run

__all__ = ["choose", "closest", "console_lines", "misses", "pareto", "run_references", "write_tune_report"]


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto(points: Mapping[str, Sequence[float]]) -> list[str]:
    """Keys of the non-dominated points (every coordinate minimised), in input order. O(n^2)."""
    return [k for k, p in points.items() if not any(_dominates(q, p) for j, q in points.items() if j != k)]


def _signed(spec: TuneSpec, metrics: Mapping[str, Any]) -> list[float] | None:
    out = []
    for m, mode in spec.directions():
        v = metrics.get(m)
        if v is None:
            return None
        out.append(float(v) if mode == "min" else -float(v))
    return out


def front(spec: TuneSpec, records: Sequence[Mapping[str, Any]], target: str) -> list[str]:
    """Trial keys on the Pareto front of ``target`` among its feasible trials."""
    pts = {}
    for r in records:
        t = r["targets"].get(target)
        if t and t["feasible"]:
            s = _signed(spec, t["metrics"])
            if s is not None:
                pts[r["key"]] = s
    return pareto(pts)


def choose(spec: TuneSpec, records: Sequence[Mapping[str, Any]], target: str) -> Mapping[str, Any] | None:
    """The chosen recipe for ``target``: the feasible trial best on the first objective, ties broken by the next."""
    cands = [
        r
        for r in records
        if r["targets"].get(target, {}).get("feasible") and _signed(spec, r["targets"][target]["metrics"]) is not None
    ]
    return min(cands, key=lambda r: (_signed(spec, r["targets"][target]["metrics"]), r["key"])) if cands else None


CLOSEST_RULE = (
    "closest = the measured trial with the least total normalised violation: each missed constraint's shortfall"
    " divided by |its limit| (the shortfall itself when the limit is 0), plus each failed validation gate's"
    " |value - limit| / |limit| (1 when not numeric), plus 1 per constrained metric the trial did not measure;"
    " ties broken by the objectives"
)


def _rel(gap: float, limit: float) -> float:
    return gap / abs(limit) if limit else gap


def misses(spec: TuneSpec, rec: Mapping[str, Any], target: str) -> list[dict[str, Any]]:
    """What keeps trial ``rec`` from meeting the constraints on ``target``, each with how much and the normalised
    share (see :data:`CLOSEST_RULE`): ``[{constraint, metric, value, limit, by, normalised}]`` (``by`` and
    ``value`` None where the metric was not measured)."""
    from targets import load_target

    prof = next(p for p in map(load_target, spec.base.targets) if p.name == target)
    t = rec["targets"][target]
    out: list[dict[str, Any]] = []
    for c in spec.constraints:
        v = t["metrics"].get(c.metric)
        lim = c.limit(prof)
        gap = c.violation(v, prof)
        if gap <= 0:
            continue
        shown = f"{c.metric} {c.op} {lim:g}" + (" (profile memory_budget_mb)" if c.value is None else "")
        out.append(
            {
                "constraint": shown,
                "metric": c.metric,
                "value": v,
                "limit": lim,
                "by": None if v is None else gap,
                "normalised": 1.0 if v is None else _rel(gap, lim),
            }
        )
    gates = t.get("gate_misses")
    if gates is None:  # a journal line from before gate_misses was recorded: the failure texts only
        gates = [{"check": g, "value": None, "limit": None} for g in t.get("gate_failures", [])]
    for g in gates:
        v, lim = g.get("value"), g.get("limit")
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, lim))
        by = abs(float(v) - float(lim)) if numeric else None
        out.append(
            {
                "constraint": f"gate {g.get('check')}",
                "metric": g.get("check"),
                "value": v,
                "limit": lim,
                "by": by,
                "normalised": _rel(by, float(lim)) if by is not None else 1.0,
            }
        )
    return out


def closest(spec: TuneSpec, records: Sequence[Mapping[str, Any]], target: str) -> dict[str, Any] | None:
    """The measured trial nearest to meeting the constraints on ``target`` (:data:`CLOSEST_RULE`), with its misses;
    None when no trial measured anything there. Meant for tunes where :func:`choose` finds nothing."""
    best = None
    for r in records:
        t = r["targets"].get(target)
        if not t or all(v is None for v in t["metrics"].values()):
            continue  # the run measured nothing (it failed or its process died): no distance to speak of
        ms = misses(spec, r, target)
        total = sum(m["normalised"] for m in ms)
        signed = _signed(spec, t["metrics"]) or [float("inf")] * len(spec.directions())
        rank = (total, signed, r["key"])
        if best is None or rank < best[0]:
            best = (rank, r, ms, total)
    if best is None:
        return None
    _, r, ms, total = best
    return {
        "trial": r["key"],
        "params": r["params"],
        "metrics": r["targets"][target]["metrics"],
        "meets_constraints": False,
        "total_violation": total,
        "misses": ms,
    }


def _miss_text(m: Mapping[str, Any]) -> str:
    if m["value"] is None:
        return f"{m['constraint']}: not measured"
    if m["by"] is None:
        return f"{m['constraint']}: {m['value']} (limit {m['limit']})"
    return (
        f"{m['constraint']}: {_fmt(m['value'])}, misses by {_fmt(m['by'])} ({100 * m['normalised']:.3g} % of the limit)"
    )


def _reference_configs(spec: TuneSpec) -> dict[str, Any]:
    """dense: the base without prune/recover, fp32 everywhere; peer: export + ORT dynamic int8 per-channel."""
    from targets import load_target

    keep = [s for s in spec.base.stages if s.kind not in ("prune", "recover")]
    out = {}
    if spec.references.dense:
        out["dense"] = spec.base.model_copy(
            update={
                "stages": [
                    s.model_copy(update={"precision": "fp32", "per_target": {}}) if s.kind == "quantize" else s
                    for s in keep
                ]
            }
        )
    if spec.references.peer and any(s.kind == "quantize" for s in keep):
        int8 = [t for t in spec.base.targets if "int8" in load_target(t).precisions]
        if int8:
            peer_stages = [
                # quantize_dynamic's default op types include Gather: the peer quantizes the embedding tables too
                # (22.9 MB for MiniLM, benchmarks/results/tune.md); the weight type is the profile's
                s.model_copy(
                    update={"precision": "int8", "per_target": {}, "per_channel": True, "quantize_embeddings": True}
                )
                if s.kind == "quantize"
                else s
                for s in keep
            ]
            out["peer"] = spec.base.model_copy(update={"stages": peer_stages, "targets": int8})
    return out


def run_references(spec: TuneSpec, layout: Layout, board: Any = None) -> dict[str, Any]:
    """Run the reference pipelines (sharing the tune's stage cache); their per-target metrics by name."""
    from pipeline.runner import run as run_pipeline

    out = {}
    for name, cfg in _reference_configs(spec).items():
        run_dir = layout.refs / name
        status, reason, report = "ok", "", None
        try:
            report = run_pipeline(cfg, workdir=run_dir, progress=False, cache_dir=layout.cache)
        except ValidationFailed as exc:
            status, reason = "infeasible", str(exc)
            report = json.loads((run_dir / "report.json").read_text())
        except EdgepipeError as exc:
            status, reason = "failed", str(exc)
        if report is not None and board is not None:
            report = board(run_dir, report)
        sub = spec.model_copy(update={"base": cfg})
        out[name] = {
            "status": status,
            "reason": reason,
            "run_dir": str(run_dir),
            "targets": summarize_run(sub, report, status, reason),
        }
    return out


def _plot(spec: TuneSpec, records, refs, target: str, keys_front: list[str], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:  # optional (extra 'tune' installs it): the CSV and the table say the same
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = (
        "cos_mean"
        if any(r["targets"].get(target, {}).get("metrics", {}).get("cos_mean") is not None for r in records)
        else "top1_agreement"
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles: tuple[tuple[bool, dict[str, Any]], ...] = (
        (True, dict(c="tab:blue", marker="o", label="feasible trial")),
        (False, dict(c="tab:gray", marker="x", label="infeasible trial")),
    )
    for feas, style in styles:
        xs = [
            (r["targets"][target]["metrics"].get("latency_ms"), r["targets"][target]["metrics"].get(fid))
            for r in records
            if r["targets"].get(target, {}).get("feasible") == feas
        ]
        xs = [p for p in xs if None not in p]
        if xs:
            ax.scatter([p[0] for p in xs], [p[1] for p in xs], **style)
    fr = sorted(
        (r["targets"][target]["metrics"]["latency_ms"], r["targets"][target]["metrics"].get(fid))
        for r in records
        if r["key"] in keys_front
    )
    fr = [p for p in fr if p[1] is not None]
    if fr:
        ax.plot(
            [p[0] for p in fr],
            [p[1] for p in fr],
            "-",
            c="tab:red",
            label=f"Pareto front ({', '.join(m for m, _ in spec.directions())})",
        )
    for name, marker in (("dense", "*"), ("peer", "D")):
        t = refs.get(name, {}).get("targets", {}).get(target)
        if t and t["metrics"].get("latency_ms") is not None and t["metrics"].get(fid) is not None:
            ax.scatter(
                [t["metrics"]["latency_ms"]],
                [t["metrics"][fid]],
                c="black" if name == "dense" else "tab:green",
                marker=marker,
                s=120,
                label="dense fp32" if name == "dense" else "peer: export + ORT int8 per-channel",
            )
    ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel(f"{fid} vs dense")
    ax.set_title(f"{target}: latency vs fidelity")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing measured: no empty legend
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def best_recipe(spec: TuneSpec, rec: Mapping[str, Any], target: str) -> dict[str, Any]:
    """The chosen trial's pipeline for one target, as `edgepipe run` reads it."""
    data = apply_params(spec, rec["params"]).to_data(as_written=True)  # omitted options keep their meaning
    data["targets"] = [t for t in spec.base.targets if _name(t) == target]
    return data


def _name(ref: str) -> str:
    from targets import load_target

    return load_target(ref).name


def _fmt(v: Any, nd: int = 4) -> str:
    return "–" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def write_tune_report(
    spec: TuneSpec,
    layout: Layout,
    records: list[dict[str, Any]],
    refs: Mapping[str, Any],
    *,
    seconds: float,
    boards: Sequence[str],
) -> dict[str, Any]:
    targets = [_name(t) for t in spec.base.targets]
    per_target: dict[str, Any] = {}
    plots = {}
    for t in targets:
        keys = front(spec, records, t)
        chosen = choose(spec, records, t)
        best_file = None
        near = None if chosen is not None else closest(spec, records, t)
        if chosen is not None:
            best_file = layout.out / f"best-{t}.yaml"
            head = f"# edgepipe tune: chosen recipe for {t} (trial {chosen['key']}); run with: edgepipe run {best_file.name}\n"
            atomic_write_text(best_file, head + yaml.safe_dump(best_recipe(spec, chosen, t), sort_keys=False))
        else:
            _remove_stale(layout.out / f"best-{t}.yaml")  # an earlier report's (the constraints changed since)
        if near is not None:
            near_file = layout.out / f"closest-{t}.yaml"
            rec = next(r for r in records if r["key"] == near["trial"])
            head = (
                f"# edgepipe tune: NOT a recipe that meets the constraints. No trial met them for {t}; this is the"
                f" closest one (trial {near['trial']}), it misses: {'; '.join(map(_miss_text, near['misses']))}\n"
                f"# run with: edgepipe run {near_file.name}\n"
            )
            atomic_write_text(near_file, head + yaml.safe_dump(best_recipe(spec, rec, t), sort_keys=False))
            near["closest_yaml"] = near_file.name
        else:
            _remove_stale(layout.out / f"closest-{t}.yaml")  # an earlier report's: a feasible trial came since
        png = layout.out / f"pareto-{t}.png"
        if _plot(spec, records, refs, t, keys, png):
            plots[t] = png.name
        per_target[t] = {
            "pareto": keys,
            "chosen": chosen["key"] if chosen else None,
            "chosen_params": chosen["params"] if chosen else None,
            "chosen_metrics": chosen["targets"][t]["metrics"] if chosen else None,
            "best_yaml": best_file.name if best_file else None,
            "closest": near,  # only when no trial is feasible: the nearest one, NOT meeting the constraints
            "measured_on": f"board in the Ray cluster (resource '{t}')"
            if t in boards
            else "this host, with the profile's threads (not the device)",
            "references": {n: r["targets"].get(t, {}).get("metrics") for n, r in refs.items()},
        }
    report = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": spec.source,
        "objective": {"directions": spec.directions(), "constraints": {c.metric: c.text for c in spec.constraints}},
        "closest_rule": CLOSEST_RULE,
        "search": spec.search.model_dump(mode="json"),
        "space": [d.model_dump(mode="json") for d in spec.dimensions],
        "seconds": round(seconds, 3),
        "trials": records,
        "references": refs,
        "targets": per_target,
        "plots": plots,
    }
    atomic_write_json(layout.out / "report.json", report)
    atomic_write_text(layout.out / "report.md", _markdown(spec, report))
    return report


def _markdown(spec: TuneSpec, rep: Mapping[str, Any]) -> str:
    dirs = spec.directions()
    L = [
        f"# edgepipe tune: {rep['source']}",
        "",
        f"{len(rep['trials'])} trials, {spec.search.algorithm} (seed {spec.search.seed}), {rep['seconds']:.0f} s. "
        f"Objective: {', '.join(f'{m} ({mode})' for m, mode in dirs)}; constraints: {', '.join(f'{k} {v}' for k, v in rep['objective']['constraints'].items()) or 'none'}.",
        "",
    ]
    for t, info in rep["targets"].items():
        L += [f"## {t}", "", f"Latency measured on {info['measured_on']}.", ""]
        if info["chosen"]:
            m = info["chosen_metrics"]
            L.append(
                f"Chosen recipe: trial `{info['chosen']}` ({', '.join(f'{k}={v}' for k, v in sorted(info['chosen_params'].items()))}): "
                + ", ".join(
                    f"{k} {_fmt(m.get(k))}"
                    for k in ("latency_ms", "size_mb", "peak_rss_mb", "cos_mean", "recall_at_10")
                    if m.get(k) is not None
                )
                + f" → `{info['best_yaml']}`"
            )
        else:
            L.append(
                "No feasible trial: no recipe meets the constraints, none is chosen and no `best-` file is written."
            )
            near = info.get("closest")
            if near:
                m = near["metrics"]
                L += [
                    "",
                    f"**Closest trial, NOT meeting the constraints:** `{near['trial']}`"
                    f" ({', '.join(f'{k}={v}' for k, v in sorted(near['params'].items()))}): "
                    + ", ".join(
                        f"{k} {_fmt(m.get(k))}"
                        for k in ("latency_ms", "size_mb", "peak_rss_mb", "cos_mean", "recall_at_10")
                        if m.get(k) is not None
                    )
                    + f" → `{near['closest_yaml']}` (its pipeline, for a closer look; not a chosen recipe).",
                    "",
                    "It misses:",
                    *[f"- {_miss_text(x)}" for x in near["misses"]],
                    "",
                    f"Total normalised violation {_fmt(near['total_violation'])} ({rep['closest_rule']}).",
                ]
            else:
                L += ["", "No trial measured anything for this target (every run failed), so none is closest."]
        L.append("")
        for n, m in info["references"].items():
            if m:
                L.append(
                    f"- reference {n}: latency {_fmt(m.get('latency_ms'))} ms, size {_fmt(m.get('size_mb'))} MB, cos_mean {_fmt(m.get('cos_mean'))}"
                )
        if t in rep["plots"]:
            L += ["", f"![Pareto {t}]({rep['plots'][t]})"]
        L += ["", f"Pareto front: {', '.join(f'`{k}`' for k in info['pareto']) or 'empty'}", ""]
    L += [
        "## Every trial",
        "",
        "| trial | options | target | feasible | attempts | latency ms | size MB | peak RSS MB | cos_mean | recall@10 | why infeasible |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["trials"]:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items()))
        for t, x in r["targets"].items():
            m = x["metrics"]
            L.append(
                f"| `{r['key'][:8]}` | {opts} | {t} | {'yes' if x['feasible'] else 'no'} | {_attempts(r)} | {_fmt(m.get('latency_ms'))} | {_fmt(m.get('size_mb'))} | {_fmt(m.get('peak_rss_mb'))} | {_fmt(m.get('cos_mean'))} | {_fmt(m.get('recall_at_10'))} | {x['why_infeasible'].replace('|', '/')} |"
            )
    return "\n".join(L) + "\n"


def _attempts(rec: Mapping[str, Any]) -> str:
    n = rec.get("attempts", 1)
    died = [c for c in rec.get("retried", []) if c]
    if not died:
        return str(n)
    return f"{n} ({'; '.join(died)})".replace("|", "/")


def _remove_stale(path: Path) -> None:
    """Remove a ``best-``/``closest-`` file an earlier report of this tune wrote (first line ``# edgepipe tune:``)
    that no longer holds: a ``best-`` file means "meets the constraints". Anything else there is left alone."""
    if path.is_symlink() or not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        if fh.readline().startswith("# edgepipe tune:"):
            path.unlink()


def console_lines(report: Mapping[str, Any]) -> list[str]:
    """Per-target summary lines for the console after a tune: the best recipe file, or that none is feasible and
    which trial is closest (NOT meeting the constraints) and what it misses."""
    out = []
    for name, t in report["targets"].items():
        if t["best_yaml"]:
            out.append(f"  {name:<18} {t['best_yaml']}")
            continue
        near = t.get("closest")
        if not near:
            out.append(f"  {name:<18} no feasible recipe (no trial measured anything)")
            continue
        out.append(
            f"  {name:<18} no feasible recipe; closest, NOT meeting the constraints: trial {near['trial'][:8]}"
            f" ({'; '.join(map(_miss_text, near['misses']))}) -> {near['closest_yaml']}"
        )
    return out
