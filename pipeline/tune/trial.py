"""One trial = one ordinary edgepipe run of the base pipeline with the trial's options, recorded in a journal.

The journal (``<workdir>/tune/trials.jsonl``, one JSON line per finished trial, appended under a lock and
fsynced) is what makes ``--resume`` exact: a trial whose options already have a finished line is answered from
the journal and never run again, whatever state Ray's own experiment checkpoint was in when the tune died.

Each attempt of a trial runs in a child process of the Ray worker (:mod:`pipeline.tune.child`), so a process killed
by the OOM killer or a native crash is seen by the worker, retried (``search.retries``) and then recorded as failed
with its cause. A per-trial attempt ledger (``trials/.<key>.attempts.jsonl``, events ``start`` / ``died`` /
``lost``, scoped to one tune invocation) counts attempts across workers: when Ray itself kills the worker (its
memory monitor), Ray Tune restarts the trial in a new worker (``FailureConfig``), the driver notes the cause
(``lost``), and the new worker counts the lost attempt against the same budget.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.tune.metrics import target_metrics
from pipeline.tune.spec import TuneSpec

__all__ = [
    "Layout",
    "death_cause",
    "metric_names",
    "note_lost_attempt",
    "objective_values",
    "params_key",
    "read_journal",
    "record_lost_trial",
    "run_trial",
    "summarize_run",
]


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
    gate_misses: dict[str, Any] = {}
    for f in (report or {}).get("failures", []):
        gate.setdefault(f.get("target"), []).append(f"{f.get('check')} {f.get('value')} (limit {f.get('limit')})")
        gate_misses.setdefault(f.get("target"), []).append(
            {"check": f.get("check"), "value": f.get("value"), "limit": f.get("limit")}
        )
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
            "gate_misses": gate_misses.get(prof.name, []),
            "feasible": feasible,
            "why_infeasible": "; ".join(why),
            "measured_on": (entry or {}).get("measured_on") or f"this host ({_threads(prof)} threads, the profile's)",
        }
    return out


def _threads(prof: Any) -> int:
    return min(prof.threads or os.cpu_count() or 1, os.cpu_count() or 1)


_FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)


def death_cause(returncode: int | None, log: Path | None = None) -> str:
    """Why a trial process ended without a result, in one line (``killed by signal 9 (SIGKILL): probably out of
    memory``); for an exit without a signal, the last line of its log."""
    if returncode is not None and returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}"
        if sig == signal.SIGKILL:
            hint = ": probably out of memory (the kernel's OOM killer) or killed by hand"
        elif sig in _FATAL_SIGNALS:
            hint = ": a crash in native code"
        else:
            hint = ""
        return f"killed by signal {-returncode} ({sig.name}){hint}"
    last = ""
    if log is not None and log.is_file():
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        last = lines[-1][:200] if lines else ""
    return f"exited with code {returncode} without a result" + (f" ({last})" if last else "")


def _ledger(layout: Layout, key: str) -> Path:
    return layout.trials / f".{key}.attempts.jsonl"


def _attempt_causes(layout: Layout, key: str, run_id: str) -> list[str]:
    """One cause per attempt of ``key`` this tune invocation started that ended without a result, in order."""
    causes: list[str | None] = []
    for ev in read_journal(_ledger(layout, key)):
        if ev.get("run") != run_id:
            continue  # an earlier invocation (a resumed tune starts every unfinished trial afresh)
        if ev.get("event") == "start":
            causes.append(None)
        elif ev.get("event") in ("died", "lost") and causes and causes[-1] is None:
            causes[-1] = str(ev.get("cause"))
    return [c or "its Ray worker died (cause not recorded)" for c in causes]


def note_lost_attempt(layout: Layout, params: Mapping[str, Any], run_id: str, cause: str) -> None:
    """Driver side: the trial's Ray worker died (Ray Tune will restart it); ``cause`` for its attempt ledger."""
    key = params_key(params)
    _append(_ledger(layout, key), {"key": key, "run": run_id, "event": "lost", "cause": cause, "at": _now()})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _attempt(layout: Layout, spec: TuneSpec, key: str, params: Mapping[str, Any], n: int) -> tuple[dict | None, str]:
    """Run attempt ``n`` in a child process: (its outcome, "") or (None, why it died)."""
    outcome = layout.trials / f".{key}.outcome.json"
    outcome.unlink(missing_ok=True)
    log = layout.trials / f"{key}.log"
    req = {
        "source": spec.source,
        "params": dict(params),
        "run_dir": str(layout.trials / key),
        "cache": str(layout.cache),
        "outcome": str(outcome),
        "attempt": n,
    }
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"--- edgepipe tune: trial {key} attempt {n}, {_now()}\n")
        fh.flush()
        # spawned, not forked: a fresh interpreter, no copy of the worker's Ray threads and sockets; its own
        # process group, so what it started (the benchmark's evaluate.py) goes with it when it is killed
        proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "pipeline.tune.child"],
            stdin=subprocess.PIPE,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EDGEPIPE_TRIAL_PARENT": str(os.getpid())},
            start_new_session=True,
        )
        try:
            proc.communicate(json.dumps(req, default=str).encode())
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers only: the child itself has exited (or is killed now)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        res = json.loads(outcome.read_text(encoding="utf-8")) if proc.returncode == 0 else None
    except (OSError, json.JSONDecodeError):
        res = None
    outcome.unlink(missing_ok=True)
    if isinstance(res, dict) and res.get("status") in ("ok", "infeasible", "failed"):
        return res, ""
    return None, death_cause(proc.returncode, log)


def _record(spec: TuneSpec, key, params, status, reason, run_dir, report, t0, causes, attempts) -> dict[str, Any]:
    return {
        "key": key,
        "params": dict(params),
        "status": status,
        "reason": reason,
        "run_dir": str(run_dir),
        "stages": [{"name": s["name"], "status": s["status"]} for s in (report or {}).get("stages", [])],
        "targets": summarize_run(spec, report, status, reason),
        "seconds": round(time.perf_counter() - t0, 3),
        "finished": _now(),
        "attempts": attempts,
        "retried": list(causes),  # why each earlier attempt (or the last one, when failed) ended without a result
    }


def run_trial(
    spec: TuneSpec,
    params: Mapping[str, Any],
    layout: Layout,
    *,
    board_runner: Any = None,
    run_id: str = "",
) -> dict[str, Any]:
    """Run (or recall from the journal) the trial with ``params``; never raises for a failing pipeline.

    Each attempt is a child process; one that dies without a result (killed, out of memory, native crash) is run
    again until ``1 + search.retries`` attempts of this tune invocation (``run_id``) were made, counting attempts
    lost with an earlier Ray worker; then the trial is recorded as ``failed`` with the cause.
    """
    key = params_key(params)
    with _locked(layout.trials / f".{key}.lock"):  # the same options twice at once: the second waits, then recalls
        for rec in read_journal(layout.journal):
            if rec["key"] == key:
                return {**rec, "recalled": True}
        run_dir = layout.trials / key
        t0 = time.perf_counter()
        causes = _attempt_causes(layout, key, run_id)
        res = None
        while res is None and len(causes) < 1 + spec.search.retries:
            n = len(causes) + 1
            _append(
                _ledger(layout, key),
                {
                    "key": key,
                    "run": run_id,
                    "event": "start",
                    "attempt": n,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "at": _now(),
                },
            )
            res, cause = _attempt(layout, spec, key, params, n)
            if res is None:
                _append(
                    _ledger(layout, key), {"key": key, "run": run_id, "event": "died", "attempt": n, "cause": cause}
                )
                causes.append(cause)
        report = None
        if res is None:
            status = "failed"
            reason = f"{causes[-1]}; {len(causes)} attempt(s), log: {layout.trials / f'{key}.log'}"
        else:
            status, reason = res["status"], res["reason"]
            report = _read_report(run_dir) if status != "failed" else None
        if report is not None and board_runner is not None:
            report = board_runner(run_dir, report)
        rec = _record(spec, key, params, status, reason, run_dir, report, t0, causes, len(causes) + (res is not None))
        _append(layout.journal, rec)
        return rec


def record_lost_trial(
    spec: TuneSpec, params: Mapping[str, Any], layout: Layout, run_id: str, cause: str, *, attempts: int = 1
) -> dict:
    """Driver side: the trial's Ray worker died on its last allowed attempt (Ray Tune gave up on it after
    ``attempts`` worker deaths); record it as failed with ``cause`` unless a worker recorded it first. Returns the
    journal record."""
    key = params_key(params)
    with _locked(layout.trials / f".{key}.lock"):
        for rec in read_journal(layout.journal):
            if rec["key"] == key:
                return rec
        _append(_ledger(layout, key), {"key": key, "run": run_id, "event": "lost", "cause": cause, "at": _now()})
        causes = _attempt_causes(layout, key, run_id) or [cause]  # empty: killed before its worker started it
        n = max(len(causes), attempts)
        reason = f"{causes[-1]}; {n} attempt(s), log: {layout.trials / f'{key}.log'}"
        rec = _record(spec, key, params, "failed", reason, layout.trials / key, None, time.perf_counter(), causes, n)
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
