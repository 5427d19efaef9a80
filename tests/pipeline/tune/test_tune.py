"""edgepipe tune on a tiny BERT, local Ray: a 6-trial grid tune killed with -9 and resumed, then its report,
Pareto set (vs brute force), shared cache, gate failures, best recipe and board routing are checked. Three of its
trials have their processes SIGKILLed mid-run (the child test hook of pipeline.tune.child): one trial's pipeline
process on every attempt, one trial's Ray worker on every attempt, one trial's pipeline process on its first
attempt only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("optuna")

from pipeline.tune.trial import params_key

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
GRID = {"prune.sparsity": [0.1, 0.5, 0.9], "quantize.precision": ["fp32", "int8"]}
GATE = 0.9999  # tiny random BERT: sparsity 0.9 gives cos_mean ~0.9998 (fails), 0.1 / 0.5 give >= 0.99993
# trials whose processes the test hook kills with SIGKILL after their first stage (see pipeline/tune/child.py)
CHILD_ALWAYS = {"prune.sparsity": 0.5, "quantize.precision": "int8"}  # retried once, then recorded as failed
WORKER_ALWAYS = {"prune.sparsity": 0.9, "quantize.precision": "int8"}  # its Ray worker dies: Tune retries, then fails
CHILD_ONCE = {"prune.sparsity": 0.5, "quantize.precision": "fp32"}  # the retry succeeds
KILLS = [
    {"match": CHILD_ALWAYS, "victim": "child"},
    {"match": WORKER_ALWAYS, "victim": "worker"},
    {"match": CHILD_ONCE, "victim": "child", "attempts": [1]},
]


def _tune_yaml(model: Path, **over) -> dict:
    data = {
        "model": {"path": str(model)},
        "targets": ["host-cpu"],
        "calibration": {"samples": 8, "heldout": 16, "max_length": 32},
        "stages": [
            {"prune": {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.25}},
            {"export": {}},
            {"quantize": {}},
            {"validate": {"min_cos_mean": GATE}},
            {"benchmark": {"runs": 3, "warmup": 1, "seq": 32}},
        ],
        "objective": {
            "minimize": ["latency_ms", "size_mb"],
            "constraints": {"cos_mean": ">= 0.5", "peak_rss_mb": "<= profile"},
        },
        "space": GRID,
        "search": {"algorithm": "grid", "trials": 6, "seed": 0},
    }
    data.update(over)
    return data


def _env(**extra: str) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def _journal(workdir: Path) -> list[dict]:
    p = workdir / "tune" / "trials.jsonl"
    if not p.is_file():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def tuned(tiny_models, tmp_path_factory):
    """Start a tune, kill -9 it after its first finished trial, resume it to the end (with the KILLS hook)."""
    root = tmp_path_factory.mktemp("tune")
    cfg = root / "tune.yaml"
    cfg.write_text(yaml.safe_dump(_tune_yaml(tiny_models["bert"])))
    workdir = root / "w"
    env = _env(EDGEPIPE_TEST_KILL_TRIAL=json.dumps(KILLS))
    proc = subprocess.Popen(
        _cli("tune", str(cfg), "--workdir", str(workdir)),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and len(_journal(workdir)) < 1 and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the tune ended before it could be killed: " + proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    try:  # Ray's own processes share the driver's fate; remove any straggler of ours before resuming
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.set_blocking(proc.stdout.fileno(), False)  # what the killed tune printed (no writer may be left)
    first_out = (proc.stdout.read() or b"").decode(errors="replace")
    before = _journal(workdir)
    mtimes = {
        r["key"]: (Path(r["run_dir"]) / "report.json").stat().st_mtime_ns
        for r in before
        if (Path(r["run_dir"]) / "report.json").exists()
    }
    res = subprocess.Popen(
        _cli("tune", str(cfg), "--workdir", str(workdir), "--resume"),
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = res.communicate(timeout=900)
    assert res.returncode == 0, out[-3000:] + err[-3000:]
    return {
        "cfg": cfg,
        "workdir": workdir,
        "before": before,
        "mtimes": mtimes,
        "out": out,
        "first_out": first_out,
        "err": err,
        "pid": res.pid,
        "report": json.loads((workdir / "tune" / "report.json").read_text()),
    }


def test_six_trial_tune_finishes_with_report(tuned):
    wd = tuned["workdir"]
    rep = tuned["report"]
    assert sorted(params_key(r["params"]) for r in rep["trials"]) == sorted(r["key"] for r in _journal(wd))
    assert {tuple(sorted(r["params"].items())) for r in rep["trials"]} == {
        (("prune.sparsity", s), ("quantize.precision", p))
        for s in GRID["prune.sparsity"]
        for p in GRID["quantize.precision"]
    }
    assert len(rep["trials"]) == 6
    out = wd / "tune"
    assert (out / "report.md").read_text().count("| host-cpu |") == 6
    assert (out / "pareto-host-cpu.png").stat().st_size > 1000
    # one progress line per trial finished in this (resumed) invocation, with the best so far
    lines = [ln for ln in tuned["out"].splitlines() if ln.startswith("edgepipe tune: trial ")]
    assert len(lines) == 6 - len(tuned["before"]) and all("best:" in ln for ln in lines)
    info = rep["targets"]["host-cpu"]
    assert "this host" in info["measured_on"] and "profile's threads" in info["measured_on"]
    assert info["references"]["dense"]["cos_mean"] > 0.99999 and info["references"]["peer"]["latency_ms"] > 0
    # nothing of Ray left running, and its temp folder is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"_{tuned['pid']}/" not in ps and str(wd) not in ps  # Ray's session folders end in the driver's pid
    import hashlib
    import tempfile

    assert not (wd / ".ray-tmp").exists()  # Ray's temp folder is gone, also the one the killed run left
    assert not (
        Path(tempfile.gettempdir()) / f"edgepipe-ray-{hashlib.sha256(str(wd.resolve()).encode()).hexdigest()[:12]}"
    ).exists()


def test_resume_after_kill_repeats_no_finished_trial(tuned):
    before = tuned["before"]
    assert 1 <= len(before) < 6
    assert f"resuming, {len(before)} trial(s) finished" in tuned["out"]
    keys = [r["key"] for r in _journal(tuned["workdir"])]
    assert len(keys) == len(set(keys)) == 6  # every trial finished exactly once
    for k, t in tuned["mtimes"].items():  # the finished trials' runs were not touched again
        rec = next(r for r in before if r["key"] == k)
        assert (Path(rec["run_dir"]) / "report.json").stat().st_mtime_ns == t


def _brute_force(tiny_bert: Path, cache: Path, root: Path) -> dict:
    """Run every grid point as an ordinary pipeline (same shared cache: the same measurements), decide
    feasibility from the run's own gate and the constraints, and compute the Pareto set independently."""
    from pipeline.errors import ValidationFailed
    from pipeline.runner import run

    base = _tune_yaml(tiny_bert)
    points = {}
    for s in GRID["prune.sparsity"]:
        for p in GRID["quantize.precision"]:
            stages = json.loads(json.dumps(base["stages"]))
            stages[0]["prune"]["sparsity"] = s
            stages[2]["quantize"]["precision"] = p
            cfg = {k: base[k] for k in ("model", "targets", "calibration")} | {"stages": stages}
            wd = root / f"bf-{s}-{p}"
            try:
                rep = run(cfg, workdir=wd, progress=False, cache_dir=cache)
            except ValidationFailed:
                rep = json.loads((wd / "report.json").read_text())
            t = rep["targets"]["host-cpu"]
            feasible = rep["ok"] and t["fidelity"]["cos_mean"] >= 0.5 and t["peak_rss_mb"] <= 4096
            # the tune never measured the trials whose processes the hook killed on every attempt
            feasible = feasible and {"prune.sparsity": s, "quantize.precision": p} not in (CHILD_ALWAYS, WORKER_ALWAYS)
            points[params_key({"prune.sparsity": s, "quantize.precision": p})] = (
                feasible,
                (t["latency_ms"]["p50"], t["size_bytes"] / 1e6),
                rep,
            )
    feas = {k: v for k, (ok, v, _) in points.items() if ok}
    front = {
        k
        for k, v in feas.items()
        if not any(all(a <= b for a, b in zip(w, v)) and w != v for j, w in feas.items() if j != k)
    }
    return {"front": front, "points": points}


def test_pareto_set_equals_brute_force(tuned, tiny_models, tmp_path):
    wd = tuned["workdir"]
    bf = _brute_force(tiny_models["bert"], wd / "cache", tmp_path)
    info = tuned["report"]["targets"]["host-cpu"]
    assert set(info["pareto"]) == bf["front"] and bf["front"]
    # the brute-force runs of every measured trial were served from the tune's cache (same measurements)
    killed = {params_key(CHILD_ALWAYS), params_key(WORKER_ALWAYS)}
    assert all(
        s["status"] == "cached" for k, (_, _, rep) in bf["points"].items() if k not in killed for s in rep["stages"]
    )
    chosen = min(bf["front"], key=lambda k: (bf["points"][k][1], k))
    assert info["chosen"] == chosen


def test_shared_cache_hit_across_trials(tuned):
    recs = [r for r in _journal(tuned["workdir"]) if r["stages"]]  # the two killed on every attempt have no run
    assert len(recs) == 4
    prune_ran: dict = {}
    for r in recs:
        st = r["stages"][0]
        assert st["name"] == "prune"
        if st["status"] == "ran":
            prune_ran[r["params"]["prune.sparsity"]] = prune_ran.get(r["params"]["prune.sparsity"], 0) + 1
    assert all(n == 1 for n in prune_ran.values())  # two trials with the same prune config pruned once
    # each trial has its own fresh run folder: of 0.1 the second trial, and the retry of CHILD_ONCE (its killed
    # first attempt published the prune), were served from the cache
    assert sum(r["stages"][0]["status"] == "cached" for r in recs) >= 2
    assert len([p for p in (tuned["workdir"] / "cache").iterdir() if not p.name.startswith(".")]) >= 3 + 3 + 6


def test_failing_gate_trial_is_infeasible_not_a_crash(tuned):
    recs = {
        r["params"]["prune.sparsity"]: r
        for r in _journal(tuned["workdir"])
        if r["params"]["quantize.precision"] == "fp32"
    }
    bad = recs[0.9]
    assert bad["status"] == "infeasible" and bad["targets"]["host-cpu"]["feasible"] is False
    assert "gate cos_mean" in bad["targets"]["host-cpu"]["why_infeasible"]
    assert bad["targets"]["host-cpu"]["metrics"]["cos_mean"] < GATE
    assert recs[0.1]["status"] == "ok" and recs[0.1]["targets"]["host-cpu"]["feasible"] is True
    assert all(k not in tuned["report"]["targets"]["host-cpu"]["pareto"] for k in [bad["key"]])


def test_killed_trials_are_retried_then_recorded_without_ending_the_tune(tuned):
    recs = {params_key(r["params"]): r for r in _journal(tuned["workdir"])}
    oom = "killed by signal 9 (SIGKILL): probably out of memory"
    # the trial whose pipeline process was SIGKILLed on both attempts: retried once, then failed with the cause
    r = recs[params_key(CHILD_ALWAYS)]
    assert r["status"] == "failed" and r["attempts"] == 2 and len(r["retried"]) == 2
    assert all(c.startswith(oom) for c in r["retried"]) and r["reason"].startswith(oom)
    assert r["targets"]["host-cpu"]["feasible"] is False and oom in r["targets"]["host-cpu"]["why_infeasible"]
    ledger = [json.loads(ln) for ln in (tuned["workdir"] / "trials" / f".{r['key']}.attempts.jsonl").open()]
    assert [e["event"] for e in ledger if e["run"] == ledger[-1]["run"]] == ["start", "died", "start", "died"]
    # the trial whose Ray worker died on both attempts: Ray Tune restarted it once, the driver recorded it
    w = recs[params_key(WORKER_ALWAYS)]
    assert w["status"] == "failed" and w["attempts"] == 2 and "Ray worker" in w["reason"], w
    # killed once: the retry measured it
    once = recs[params_key(CHILD_ONCE)]
    assert once["status"] == "ok" and once["attempts"] == 2 and once["retried"][0].startswith(oom)
    assert once["targets"]["host-cpu"]["feasible"] is True
    # the tune went on: every trial is in the report, the killed ones with their causes
    assert len(tuned["report"]["trials"]) == 6
    md = (tuned["workdir"] / "tune" / "report.md").read_text()
    assert md.count(oom) >= 2 and f"`{r['key'][:8]}`" in md and f"`{w['key'][:8]}`" in md
    # progress lines say so (in the killed or the resumed invocation, wherever the trial finished)
    out = tuned["first_out"] + tuned["out"]
    assert f"{r['key'][:8]} (failed after 2 attempt(s): {oom}" in out
    assert f"{once['key'][:8]} (retried 1x after: {oom}" in out
    assert f"edgepipe tune: retrying trial {w['key'][:8]}" in out and "(attempt 2 of 2)" in out


def test_best_yaml_reproduces_the_chosen_artifact(tuned, tmp_path):
    from pipeline.runner import run

    info = tuned["report"]["targets"]["host-cpu"]
    best = tuned["workdir"] / "tune" / info["best_yaml"]
    rec = next(r for r in tuned["report"]["trials"] if r["key"] == info["chosen"])
    want = json.loads((Path(rec["run_dir"]) / "manifest.json").read_text())["outputs_sha256"]
    run(best, workdir=tmp_path / "again", progress=False)  # no cache: recomputed from scratch
    got = json.loads((tmp_path / "again" / "manifest.json").read_text())["outputs_sha256"]
    assert got["host-cpu/model.onnx"] == want["host-cpu/model.onnx"]
    assert {k: v for k, v in got.items() if not k.endswith(".ort")} == {
        k: v for k, v in want.items() if not k.endswith(".ort")
    }


def test_bad_space_is_one_line_error_before_anything_starts(tiny_models, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_tune_yaml(tiny_models["bert"], space={"prune.sparsityy": [0.1]})))
    res = subprocess.run(
        _cli("tune", str(cfg), "--workdir", str(tmp_path / "w")),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "space.prune.sparsityy" in err[0] and "unknown option 'sparsityy'" in err[0], res.stderr
    assert not (tmp_path / "w").exists()


def test_board_routing_to_a_named_node(tuned, monkeypatch):
    """A fake second node advertises the 'host-cpu' resource: the benchmark task runs there, not on the head."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.tune.board import BoardBench, bench_bundle_dir

    rec = next(r for r in tuned["report"]["trials"] if r["status"] == "ok")
    run_dir = Path(rec["run_dir"])
    report = json.loads((run_dir / "report.json").read_text())
    assert bench_bundle_dir(run_dir, report, "host-cpu") is not None
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ep-rt-", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    board = cluster.add_node(num_cpus=1, resources={"host-cpu": 1})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        out = BoardBench(["host-cpu"], runs=2, threads={"host-cpu": 1})(run_dir, report)
        t = out["targets"]["host-cpu"]
        assert t["measured_on"].startswith("board ") and board.node_id[:12] in t["measured_on"]
        assert t["latency_ms"]["p50"] > 0 and t["peak_rss_mb"] > 0
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_console_holds_edgepipe_lines_only(tuned):
    """Ray's own logging (token notice, Tune's status tables, worker output) stays off the console."""
    noise = [
        ln for ln in (tuned["out"] + tuned["err"]).splitlines() if ln.strip() and not ln.startswith(("edgepipe", "  "))
    ]
    assert not noise, noise[:5]


def _our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (zombies excluded), read from /proc."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append(cmd[:200])
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find left-over processes")
def test_sigterm_stops_the_tune_cleanly(tiny_models, tmp_path):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump(_tune_yaml(tiny_models["bert"])))
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        _cli("tune", str(cfg), "--workdir", str(workdir)),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 600
    trials = workdir / "trials"
    while time.time() < deadline and not (trials.is_dir() and any(trials.iterdir())) and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the tune ended before it could be stopped"
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)  # a trial in flight: its Ray worker must go too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out + err
    assert err.strip().splitlines() == [
        f"edgepipe: tune stopped by SIGTERM; Ray is shut down and finished trials are kept: continue with"
        f" 'edgepipe tune {cfg} --workdir {workdir} --resume'"
    ]
    assert all(ln.startswith("edgepipe tune: trial ") for ln in out.splitlines() if ln.strip())
    time.sleep(2)
    assert not _our_processes(str(tmp_path)), "Ray processes left running after SIGTERM"
    assert not (workdir / ".ray-tmp").exists()


def test_address_attaches_to_a_running_cluster_and_leaves_it_running(tiny_models, tmp_path, monkeypatch):
    """`--address` runs the trials on an existing Ray cluster (here: a local head started by the test) and
    disconnects afterwards without stopping that cluster."""
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="ep-rc-", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cfg = tmp_path / "tune.yaml"
        space = {"prune.sparsity": [0.5], "quantize.precision": ["fp32"]}
        cfg.write_text(yaml.safe_dump(_tune_yaml(tiny_models["bert"], space=space)))
        workdir = tmp_path / "w"
        res = subprocess.run(
            _cli("tune", str(cfg), "--workdir", str(workdir), "--address", cluster.address, "--trials", "1"),
            cwd=tmp_path,
            env={**_env(), "RAY_TMPDIR": ray_tmp},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        trials = _journal(workdir)
        assert [t["status"] for t in trials] == ["ok"]
        assert cluster.remaining_processes_alive()  # the user's cluster is not shut down by edgepipe
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
