"""Failed trials without Ray: the closest infeasible trial on a hand-made journal, the report and console text
around it, the attempt ledger the driver and the workers share, and the causes named for dead processes."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.tune.report import closest, console_lines, write_tune_report
from pipeline.tune.spec import parse_tune
from pipeline.tune.trial import (
    Layout,
    death_cause,
    note_lost_attempt,
    params_key,
    read_journal,
    record_lost_trial,
    summarize_run,
)

BUDGET = 4096  # host-cpu's memory_budget_mb
TUNE = {
    "targets": ["host-cpu"],
    "stages": [
        {"prune": {"pattern": "structured"}},
        {"export": {}},
        {"quantize": {}},
        {"validate": {}},
        {"benchmark": {}},
    ],
    "objective": {
        "minimize": ["latency_ms"],
        "constraints": {"cos_mean": ">= 0.97", "recall_at_10": ">= 0.90", "peak_rss_mb": "<= profile"},
    },
    "space": {"prune.ffn_sparsity": {"low": 0.0, "high": 0.75}, "quantize.precision": ["fp32", "int8"]},
}


@pytest.fixture
def spec(tmp_path):
    src = tmp_path / "tune.yaml"
    src.write_text(yaml.safe_dump(TUNE))
    return parse_tune(TUNE, source=str(src))


def _rec(spec, ffn: float, *, cos=None, recall=None, rss=None, latency=None, gates=(), status=None) -> dict:
    """A journal line as run_trial writes it, from a fake run report (None metrics: the run measured nothing)."""
    params = {"prune.ffn_sparsity": ffn, "quantize.precision": "int8"}
    report = None
    if cos is not None:
        report = {
            "targets": {
                "host-cpu": {
                    "latency_ms": {"p50": latency},
                    "size_bytes": 10_000_000,
                    "peak_rss_mb": rss,
                    "fidelity": {"cos_mean": cos, "recall_at_10": recall},
                }
            },
            "failures": [{"target": "host-cpu", "check": c, "value": v, "limit": lim} for c, v, lim in gates],
        }
    status = status or ("infeasible" if gates else "ok") if report else "failed"
    return {
        "key": params_key(params),
        "params": params,
        "status": status,
        "reason": "" if report else "killed by signal 9 (SIGKILL): probably out of memory",
        "run_dir": "-",
        "stages": [],
        "targets": summarize_run(spec, report, status, ""),
        "attempts": 1 if report else 2,
        "retried": [] if report else ["killed by signal 9 (SIGKILL)"] * 2,
    }


def _journal(spec):
    return [
        _rec(spec, 0.1, cos=0.92, recall=0.95, rss=100, latency=5.0),  # cos short by 0.05: 0.05 / 0.97 = 0.0515
        _rec(spec, 0.2, cos=0.99, recall=0.95, rss=BUDGET + 1, latency=9.0),  # 1 MB over: 1 / 4096 = 0.000244
        _rec(spec, 0.3, cos=0.99, recall=0.99, rss=100, latency=1.0, gates=[("cos_mean", 0.99, 0.995)]),  # 0.005
        _rec(spec, 0.4),  # its process died: nothing measured
    ]


def test_closest_is_least_total_normalised_violation(spec):
    recs = _journal(spec)
    assert not any(r["targets"]["host-cpu"]["feasible"] for r in recs)
    near = closest(spec, recs, "host-cpu")
    # raw shortfalls would pick the cosine miss (0.05 < 1 MB); normalised by the limit, 1 MB of 4096 is nearest
    assert near["trial"] == recs[1]["key"] and near["meets_constraints"] is False
    assert near["total_violation"] == pytest.approx(1 / BUDGET)
    (m,) = near["misses"]
    assert m["metric"] == "peak_rss_mb" and m["value"] == BUDGET + 1 and m["limit"] == BUDGET and m["by"] == 1
    assert "profile" in m["constraint"]
    # without it, the failed gate (0.005 / 0.995) beats the cosine constraint (0.05 / 0.97)
    near = closest(spec, [recs[0], recs[2], recs[3]], "host-cpu")
    assert near["trial"] == recs[2]["key"]
    assert near["misses"] == [
        {
            "constraint": "gate cos_mean",
            "metric": "cos_mean",
            "value": 0.99,
            "limit": 0.995,
            "by": pytest.approx(0.005),
            "normalised": pytest.approx(0.005 / 0.995),
        }
    ]
    # two constraints missed: both counted
    two = _rec(spec, 0.5, cos=0.96, recall=0.81, rss=100, latency=0.5)
    near = closest(spec, [two], "host-cpu")
    assert near["total_violation"] == pytest.approx(0.01 / 0.97 + 0.09 / 0.90)
    assert [m["metric"] for m in near["misses"]] == ["cos_mean", "recall_at_10"]
    # only runs that measured nothing: no closest trial
    assert closest(spec, [recs[3]], "host-cpu") is None


def test_equal_violation_is_broken_by_the_objective(spec):
    slow = _rec(spec, 0.1, cos=0.96, recall=0.95, rss=100, latency=9.0)
    fast = _rec(spec, 0.2, cos=0.96, recall=0.95, rss=100, latency=2.0)
    assert closest(spec, [slow, fast], "host-cpu")["trial"] == fast["key"]


def test_report_names_the_closest_trial_and_writes_no_best_file(spec, tmp_path):
    layout = Layout(tmp_path / "w", spec)
    layout.out.mkdir(parents=True)
    (layout.out / "best-host-cpu.yaml").write_text("# edgepipe tune: chosen recipe for host-cpu (trial x)\n")
    recs = _journal(spec)
    rep = write_tune_report(spec, layout, recs, {}, seconds=1.0, boards=[])
    info = rep["targets"]["host-cpu"]
    assert info["chosen"] is None and info["best_yaml"] is None and info["pareto"] == []
    near = info["closest"]
    assert near["trial"] == recs[1]["key"] and near["closest_yaml"] == "closest-host-cpu.yaml"
    assert "normalised" in rep["closest_rule"] and "|its limit|" in rep["closest_rule"]
    assert json.loads((layout.out / "report.json").read_text())["targets"]["host-cpu"]["closest"] == near
    # a stale best- file (it would claim the constraints are met) is gone; the closest- file is a runnable pipeline
    assert not (layout.out / "best-host-cpu.yaml").exists()
    text = (layout.out / "closest-host-cpu.yaml").read_text()
    assert text.startswith("# edgepipe tune: NOT a recipe that meets the constraints.")
    assert "peak_rss_mb <= 4096" in text.splitlines()[0]
    cfg = parse_config(yaml.safe_load(text))
    assert cfg.stages[0].ffn_sparsity == 0.2 and cfg.stages[2].precision == "int8"
    md = (layout.out / "report.md").read_text()
    assert "No feasible trial: no recipe meets the constraints" in md
    assert f"**Closest trial, NOT meeting the constraints:** `{recs[1]['key']}`" in md
    assert "- peak_rss_mb <= 4096 (profile memory_budget_mb): 4097, misses by 1 (0.0244 % of the limit)" in md
    assert "`closest-host-cpu.yaml`" in md and "Total normalised violation 0.0002441" in md
    # every trial is listed, the dead one with its attempts and cause
    row = next(ln for ln in md.splitlines() if f"`{recs[3]['key'][:8]}`" in ln)
    assert "| 2 (killed by signal 9 (SIGKILL); killed by signal 9 (SIGKILL)) |" in row and "| no |" in row
    (line,) = console_lines(rep)
    assert "host-cpu" in line and "no feasible recipe; closest, NOT meeting the constraints" in line
    assert f"trial {recs[1]['key'][:8]}" in line and "peak_rss_mb <= 4096" in line
    assert line.endswith("-> closest-host-cpu.yaml")

    # a feasible trial arrives (a resumed tune): the best- file is written and the closest- file removed
    ok = _rec(spec, 0.6, cos=0.99, recall=0.99, rss=100, latency=3.0)
    rep = write_tune_report(spec, layout, [*recs, ok], {}, seconds=1.0, boards=[])
    assert rep["targets"]["host-cpu"]["chosen"] == ok["key"] and rep["targets"]["host-cpu"]["closest"] is None
    assert (layout.out / "best-host-cpu.yaml").is_file() and not (layout.out / "closest-host-cpu.yaml").exists()
    assert console_lines(rep) == [f"  {'host-cpu':<18} best-host-cpu.yaml"]


def test_a_file_edgepipe_did_not_write_is_left_alone(spec, tmp_path):
    layout = Layout(tmp_path / "w", spec)
    layout.out.mkdir(parents=True)
    mine = layout.out / "best-host-cpu.yaml"
    mine.write_text("my own notes\n")
    write_tune_report(spec, layout, _journal(spec), {}, seconds=1.0, boards=[])
    assert mine.read_text() == "my own notes\n"


def test_no_measured_trial_says_so(spec, tmp_path):
    layout = Layout(tmp_path / "w", spec)
    rep = write_tune_report(spec, layout, [_rec(spec, 0.4)], {}, seconds=1.0, boards=[])
    assert rep["targets"]["host-cpu"]["closest"] is None
    assert "every run failed" in (layout.out / "report.md").read_text()
    assert console_lines(rep) == [f"  {'host-cpu':<18} no feasible recipe (no trial measured anything)"]


def test_retries_option(tmp_path):
    assert parse_tune(TUNE, source="t.yaml").search.retries == 1
    assert parse_tune({**TUNE, "search": {"retries": 0}}, source="t.yaml").search.retries == 0
    with pytest.raises(ConfigError, match=r"search\.retries"):
        parse_tune({**TUNE, "search": {"retries": -1}}, source="t.yaml")


def test_death_causes(tmp_path):
    assert (
        death_cause(-9)
        == "killed by signal 9 (SIGKILL): probably out of memory (the kernel's OOM killer) or killed by hand"
    )
    assert death_cause(-11) == "killed by signal 11 (SIGSEGV): a crash in native code"
    log = tmp_path / "t.log"
    log.write_text("--- attempt 1\nFatal Python error: Aborted\n\n")
    assert death_cause(3, log) == "exited with code 3 without a result (Fatal Python error: Aborted)"


def test_attempt_ledger_spans_workers_and_ignores_earlier_invocations(spec, tmp_path):
    layout = Layout(tmp_path / "w", spec)
    layout.trials.mkdir(parents=True)
    params = {"prune.ffn_sparsity": 0.1, "quantize.precision": "int8"}
    key = params_key(params)
    ledger = layout.trials / f".{key}.attempts.jsonl"
    lines = [
        {"key": key, "run": "r1", "event": "start", "attempt": 1},  # an earlier invocation, killed -9
        {"key": key, "run": "r2", "event": "start", "attempt": 1},
        {"key": key, "run": "r2", "event": "died", "attempt": 1, "cause": "killed by signal 9 (SIGKILL)"},
        {"key": key, "run": "r2", "event": "start", "attempt": 2},
    ]
    ledger.write_text("".join(json.dumps(e) + "\n" for e in lines))
    # the driver: the worker running attempt 2 died, Ray Tune gives up; the record names both causes
    mm = "killed by Ray's memory monitor: the node ran low on memory (6.4GB used / 23.5GB limit)"
    rec = record_lost_trial(spec, params, layout, "r2", mm, attempts=1)
    assert rec["status"] == "failed" and rec["attempts"] == 2
    assert rec["retried"] == ["killed by signal 9 (SIGKILL)", mm] and rec["reason"].startswith(mm + "; 2 attempt(s)")
    assert rec["targets"]["host-cpu"]["feasible"] is False
    # recorded once: a second report of the same trial returns the journal line
    assert record_lost_trial(spec, params, layout, "r2", "other", attempts=3)["reason"] == rec["reason"]
    assert len(read_journal(layout.journal)) == 1
    # killed before its worker ever started it (no start in the ledger): Tune's count of failures
    other = {"prune.ffn_sparsity": 0.2, "quantize.precision": "int8"}
    note_lost_attempt(layout, other, "r2", mm)
    rec = record_lost_trial(spec, other, layout, "r2", mm, attempts=2)
    assert rec["attempts"] == 2 and rec["retried"] == [mm]


def test_worker_death_causes():
    from pipeline.tune.search import worker_death_cause

    oom = (
        "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.1, ID: ab)"
        " was 6.44GB used / 23.54GB limit (0.273733)"
    )
    want = "killed by Ray's memory monitor: the node ran low on memory (6.44GB used / 23.54GB limit)"
    assert worker_death_cause(oom) == want
    assert worker_death_cause(want + "\n") == want  # the text of the converted error passes through
    died = (
        "The actor died unexpectedly before finishing this task.\n\tclass_name: ImplicitFunc\nThe actor is dead because"
        " its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits"
        " with a connection error code 2. End of file. There are some potential root causes."
    )
    assert worker_death_cause(died) == (
        "its Ray worker process died (Worker unexpectedly exits with a connection error code 2)"
    )
    raised = "ray::ImplicitFunc.train() (pid=1, ip=x)\nTraceback (most recent call last):\n  ...\nOSError: board gone\n"
    assert worker_death_cause(raised) == "the trial's Ray worker raised OSError: board gone"


def test_memory_monitor_kill_is_handed_to_tune_as_the_actors_death(monkeypatch):
    """Ray Tune 2.60 ends the whole fit on OutOfMemoryError from a trial task; the patch hands it on as a
    RayActorError (the trial's death, retried under FailureConfig) and leaves every other error alone."""
    pytest.importorskip("ray")
    from ray.air.execution._internal import actor_manager as am
    from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError

    from pipeline.tune.search import _memory_monitor_kills_fail_the_trial

    seen = []

    def recorder(self, task, exc):
        seen.append(exc)

    monkeypatch.setattr(am.RayActorManager, "_actor_task_failed", recorder)
    other = RayTaskError("f", "tb", ValueError("x"))
    with _memory_monitor_kills_fail_the_trial():
        am.RayActorManager._actor_task_failed(
            None, None, OutOfMemoryError("node running low on memory ... was 7GB used / 8GB limit (0.9)")
        )
        am.RayActorManager._actor_task_failed(None, None, other)
    assert am.RayActorManager._actor_task_failed is recorder  # restored
    assert isinstance(seen[0], RayActorError)
    assert str(seen[0]) == "killed by Ray's memory monitor: the node ran low on memory (7GB used / 8GB limit)"
    assert seen[1] is other


def test_raylet_notices_are_dropped_unless_debug(monkeypatch):
    pytest.importorskip("ray")
    import ray._private.worker as rw

    from pipeline.tune.search import _raylet_notices_off

    seen = []
    monkeypatch.setattr(rw, "print_to_stdstream", lambda data, *a, **k: seen.append(data["pid"]))
    with _raylet_notices_off():
        rw.print_to_stdstream({"pid": "raylet", "lines": ["A worker died or was killed"]}, ignore_prefix=False)
        rw.print_to_stdstream({"pid": 123, "lines": ["hello"]}, ignore_prefix=False)
    rw.print_to_stdstream({"pid": "raylet", "lines": ["after"]}, ignore_prefix=False)
    assert seen == [123, "raylet"]


def test_local_ray_ignores_a_cluster_named_in_the_environment(tmp_path, monkeypatch, spec):
    """Without --address the tune starts its own local Ray, also when RAY_ADDRESS names a cluster (ray.init would
    otherwise attach to it, and refuse num_cpus there)."""
    ray = pytest.importorskip("ray")
    from pipeline.tune import search

    calls = []
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    layout = Layout(tmp_path / "w", spec)
    search._ray_init(None, layout)
    search._ray_init("ray://head:10001", layout)
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= 1
    assert calls[1]["address"] == "ray://head:10001" and "num_cpus" not in calls[1]
