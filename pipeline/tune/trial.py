"""One trial = one ordinary edgepipe run of the base pipeline with the trial's options, recorded in a journal.

The journal (``<workdir>/tune/trials.jsonl``, one JSON line per finished trial, appended under a lock and
fsynced) is what makes ``--resume`` exact: a trial whose options already have a finished line is answered from
the journal and never run again, whatever state Ray's own experiment checkpoint was in when the tune died.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import EdgepipeError, ValidationFailed
from pipeline.tune.metrics import target_metrics
from pipeline.tune.spec import TuneSpec, apply_params

__all__ = ["Layout", "metric_names", "objective_values", "params_key", "read_journal", "run_trial", "summarize_run"]


class Layout:
    """Folders of a tune work directory."""

    def __init__(self, workdir: Path, spec: TuneSpec) -> None:
        self.root = Path(workdir).resolve()
        self.out = self.root / "tune"  # report.md/json, plots, best-<target>.yaml, trials.jsonl
        self.trials = self.root / "trials"  # one edgepipe run folder per distinct trial
        self.refs = self.root / "references"  # dense and peer runs
        self.ray = self.root / "ray"  # Ray Tune experiment state
        self.cache = Path(spec.cache.dir).resolve() if spec.cache.dir else self.root / "cache"
        self.journal = self.out / "trials.jsonl"


def params_key(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(params), sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()


def read_journal(journal: Path) -> list[dict[str, Any]]:
    """Finished trials, in order; a line cut short by a kill is ignored."""
    out: list[dict[str, Any]] = []
    if not journal.is_file():
        return out
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out


def _append(journal: Path, rec: Mapping[str, Any]) -> None:
    with _locked(journal.with_suffix(".lock")):
        with open(journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summarize_run(spec: TuneSpec, report: Mapping[str, Any] | None, status: str, reason: str) -> dict[str, Any]:
    """Per-target metrics, constraint violations and feasibility of one finished run."""
    from targets import load_target

    gate: dict[str, Any] = {}
    for f in (report or {}).get("failures", []):
        gate.setdefault(f.get("target"), []).append(f"{f.get('check')} {f.get('value')} (limit {f.get('limit')})")
    out: dict[str, Any] = {}
    for ref in spec.base.targets:
        prof = load_target(ref)
        entry = ((report or {}).get("targets") or {}).get(prof.name)
        metrics = target_metrics(entry) if entry else {}
        viol = {c.metric: c.violation(metrics.get(c.metric), prof) for c in spec.constraints}
        failed_gates = gate.get(prof.name, [])
        feasible = entry is not None and status != "failed" and not failed_gates and all(v <= 0 for v in viol.values())
        why = [f"gate {g}" for g in failed_gates] + [
            f"{c.metric} {metrics.get(c.metric)} not {c.text}" for c in spec.constraints if viol[c.metric] > 0
        ]
        if entry is None:
            why.append(reason or "no result")
        out[prof.name] = {
            "metrics": metrics,
            "violations": viol,
            "gate_failures": failed_gates,
            "feasible": feasible,
            "why_infeasible": "; ".join(why),
            "measured_on": (entry or {}).get("measured_on") or f"this host ({_threads(prof)} threads, the profile's)",
        }
    return out


def _threads(prof: Any) -> int:
    return min(prof.threads or os.cpu_count() or 1, os.cpu_count() or 1)


def run_trial(spec: TuneSpec, params: Mapping[str, Any], layout: Layout, *, board_runner: Any = None) -> dict[str, Any]:
    """Run (or recall from the journal) the trial with ``params``; never raises for a failing pipeline."""
    from pipeline.runner import run as run_pipeline

    key = params_key(params)
    with _locked(layout.trials / f".{key}.lock"):  # the same options twice at once: the second waits, then recalls
        for rec in read_journal(layout.journal):
            if rec["key"] == key:
                return {**rec, "recalled": True}
        run_dir = layout.trials / key
        t0 = time.perf_counter()
        status, reason, report = "ok", "", None
        try:
            cfg = apply_params(spec, params)
            report = run_pipeline(cfg, workdir=run_dir, progress=False, cache_dir=layout.cache)
        except ValidationFailed as exc:
            status, reason, report = "infeasible", str(exc).split(";")[0], _read_report(run_dir)
        except EdgepipeError as exc:
            status, reason = "failed", str(exc)
        except Exception as exc:  # a broken trial is a data point, not the end of the tune
            status, reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if report is not None and board_runner is not None:
            report = board_runner(run_dir, report)
        rec = {
            "key": key,
            "params": dict(params),
            "status": status,
            "reason": reason,
            "run_dir": str(run_dir),
            "stages": [{"name": s["name"], "status": s["status"]} for s in (report or {}).get("stages", [])],
            "targets": summarize_run(spec, report, status, reason),
            "seconds": round(time.perf_counter() - t0, 3),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _append(layout.journal, rec)
        return rec


def objective_values(spec: TuneSpec, rec: Mapping[str, Any]) -> tuple[list[float] | None, list[float]]:
    """(objective values in :func:`metric_names` order, or None if any is unmeasured; Optuna constraint values,
    <= 0 feasible: every constraint's violation per target, plus 1 per target that failed a gate or the run)."""
    from targets import load_target

    values: list[float] | None = []
    cons: list[float] = []
    for ref in spec.base.targets:
        t = rec["targets"][load_target(ref).name]
        for metric, _ in spec.directions():
            v = t["metrics"].get(metric)
            if values is not None:
                values = None if v is None else values + [float(v)]
        cons.extend(float(v) for v in t["violations"].values())
        cons.append(0.0 if t["feasible"] else 1.0)
    return values, cons


def metric_names(spec: TuneSpec) -> list[tuple[str, str]]:
    """Ray/Optuna metric names ``metric@target`` with their modes, in :func:`objective_values` order."""
    from targets import load_target

    return [(f"{m}@{load_target(t).name}", mode) for t in spec.base.targets for m, mode in spec.directions()]
