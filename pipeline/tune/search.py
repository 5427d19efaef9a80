"""``edgepipe tune``: Ray Tune's ``Tuner`` with an Optuna multi-objective sampler (``OptunaSearch``).

Local Ray by default (``ray.init`` with this machine's cores, no dashboard, shut down afterwards); ``address``
attaches to an existing cluster (its work directory and cache must then be on storage every node sees).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, EdgepipeError
from pipeline.tune.spec import SAMPLERS, TuneSpec, grid_size, load_tune, tune_identity
from pipeline.tune.trial import (
    Layout,
    metric_names,
    note_lost_attempt,
    objective_values,
    params_key,
    read_journal,
    record_lost_trial,
    run_trial,
)

__all__ = ["MissingExtra", "tune"]


class MissingExtra(EdgepipeError):
    """ray / optuna are not installed."""


def _require() -> None:
    os.environ.setdefault(
        "RAY_AIR_NEW_OUTPUT", "0"
    )  # the classic reporter honours verbose=0: our own progress lines only
    # Ray Tune's own SIGINT handler turns the first Ctrl-C into "finish the experiment" (then the references would
    # run); edgepipe's handler stops at once instead and the journal keeps the finished trials for --resume
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # a failed trial measured nothing and reports no objective values (the searcher marks it pruned); Ray Tune's
    # strict check would end the whole fit on that result ("did not include the specified metric(s)")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    try:
        import optuna  # noqa: F401
        import ray  # noqa: F401
        from ray import tune as _  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"edgepipe tune needs the 'tune' extra ({exc.name} is missing): pip install 'edgepipe[tune]'"
        ) from None


def _distributions(spec: TuneSpec) -> dict[str, Any]:
    import optuna.distributions as od

    out: dict[str, Any] = {}
    for d in spec.dimensions:
        if d.choices is not None:
            out[d.name] = od.CategoricalDistribution(list(d.choices))
        elif d.integer:
            assert d.low is not None and d.high is not None  # a range (choices is None)
            out[d.name] = od.IntDistribution(int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            assert d.low is not None and d.high is not None  # a range (choices is None)
            out[d.name] = od.FloatDistribution(d.low, d.high, step=d.step, log=d.log)
    return out


def _searcher(spec: TuneSpec, prior: list[dict[str, Any]]):
    from pipeline.tune.samplers import ConstrainedOptunaSearch

    names = metric_names(spec)
    n = spec.search.trials
    population = spec.search.population or max(2, n // 3)
    sampler = SAMPLERS[spec.search.algorithm](spec.search.seed, population, spec.dimensions)
    prior_trials = []
    for rec in prior:
        values, cons = objective_values(spec, rec)
        prior_trials.append((rec["params"], values, cons))
    return ConstrainedOptunaSearch(
        space=_distributions(spec),
        metric=[m for m, _ in names],
        mode=[md for _, md in names],
        sampler=sampler,
        seed=spec.search.seed,
        prior=prior_trials,
    )


def _trainable(config: dict[str, Any], source: str, workdir: str, board: Any, run_id: str) -> dict[str, Any]:
    """Ray Tune function trainable (runs in a Ray worker): one edgepipe run in a child process, never raises."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("edgepipe").setLevel(logging.WARNING)
    spec = load_tune(source)
    rec = run_trial(spec, _flat(config), Layout(Path(workdir), spec), board_runner=board, run_id=run_id)
    values, cons = objective_values(spec, rec)
    out: dict[str, Any] = {"constraints": cons, "record_json": json.dumps(rec, default=str)}
    if values is not None:
        out.update({m: v for (m, _), v in zip(metric_names(spec), values)})
    return out


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, name))
        else:
            out[name] = v
    return out


def _line(rec: dict[str, Any], done: int, total: int, spec: TuneSpec, best: dict[str, Any]) -> str:
    main = spec.directions()[0][0]
    params = " ".join(f"{k}={v}" for k, v in sorted(rec["params"].items()))
    parts = []
    for name, t in rec["targets"].items():
        m = t["metrics"]
        state = "ok" if t["feasible"] else "infeasible"
        vals = " ".join(f"{k}={m.get(k):.4g}" for k, _ in spec.directions() if m.get(k) is not None)
        parts.append(f"{name}: {state} {vals}")
        if t["feasible"]:
            mode_min = spec.directions()[0][1] == "min"
            cur = best.get(name)
            if cur is None or (m[main] < cur[1] if mode_min else m[main] > cur[1]):
                best[name] = (rec["key"], m[main])
    best_s = ", ".join(f"{n} {main}={v:.4g} ({k[:8]})" for n, (k, v) in best.items()) or "none feasible yet"
    again = " (recalled from the journal)" if rec.get("recalled") else ""
    if rec["status"] == "failed" and rec.get("retried"):
        again += f" (failed after {rec.get('attempts', len(rec['retried']))} attempt(s): {rec['retried'][-1]})"
    elif rec.get("retried"):
        again += f" (retried {len(rec['retried'])}x after: {'; '.join(rec['retried'])})"
    return (
        f"edgepipe tune: trial {done}/{total} {rec['key'][:8]}{again} [{params}] {' | '.join(parts)} || best: {best_s}"
    )


_MEMORY_MONITOR = "killed by Ray's memory monitor: the node ran low on memory"


def _memory_monitor_cause(text: str) -> str:
    m = re.search(r"was ([\d.]+\s*\w+ used / [\d.]+\s*\w+ limit)", text)
    return _MEMORY_MONITOR + (f" ({m.group(1)})" if m else "")


def worker_death_cause(text: str) -> str:
    """One line for Ray Tune's error text of a trial that ended without a result: its Ray worker died (Ray's memory
    monitor, a signal) or, rarely, the trainable itself raised (then the exception's last line)."""
    if _MEMORY_MONITOR in text:
        return text.strip().splitlines()[0]
    if "low on memory" in text:
        return _memory_monitor_cause(text)
    m = re.search(r"Worker exit detail: ([^.\n]*)", text)
    if m or "actor died" in text or not text.strip():
        return "its Ray worker process died" + (f" ({m.group(1).strip()[:160]})" if m else "")
    return f"the trial's Ray worker raised {text.strip().splitlines()[-1].strip()[:200]}"


@contextmanager
def _memory_monitor_kills_fail_the_trial() -> Iterator[None]:
    """Ray Tune 2.60's actor manager raises ``RuntimeError("Caught unexpected exception")`` for a trial task whose
    worker Ray's memory monitor killed (``OutOfMemoryError`` is neither ``RayActorError`` nor ``RayTaskError``), and
    that ends the whole ``fit``. Within this context such an error is handed to Tune as the death of that trial's
    actor (``RayActorError``), so only that trial fails, and ``FailureConfig`` retries it."""
    try:
        from ray.air.execution._internal import actor_manager as am
        from ray.exceptions import OutOfMemoryError, RayActorError

        orig = am.RayActorManager._actor_task_failed
    except (ImportError, AttributeError):  # another Ray: the RuntimeError fallback in _fit still names the cause
        yield
        return

    def _task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, OutOfMemoryError):
            exception = RayActorError(error_msg=_memory_monitor_cause(str(exception)))
        return orig(self, tracked_actor_task, exception)

    am.RayActorManager._actor_task_failed = _task_failed  # type: ignore[method-assign]
    try:
        yield
    finally:
        am.RayActorManager._actor_task_failed = orig  # type: ignore[method-assign]


def _last_error(trial: Any) -> str:
    """The last failure Ray Tune appended to the trial's error file ("Failure # N (occurred at ...)" blocks)."""
    try:
        text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace") if trial.error_file else ""
    except OSError:
        return ""
    return re.split(r"^Failure # \d+.*$", text, flags=re.M)[-1].strip()


_IDENTITY = "tune-identity.json"


def _check_same_tune(spec: TuneSpec, layout: Layout, prior: list[dict[str, Any]]) -> None:
    """A resumed tune must measure what its journal measured: the same base pipeline, space and objective.

    Raises:
        ConfigError: a part changed (the journal's feasibility and Pareto set would mix two different questions).
    """
    path = layout.out / _IDENTITY
    if not prior or not path.is_file():  # nothing finished yet, or a tune from before the identity was recorded
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    changed = [
        part
        for part, value in tune_identity(spec).items()
        if json.dumps(old.get(part), sort_keys=True) != json.dumps(value, sort_keys=True)
    ]
    if changed:
        raise ConfigError(
            f"{spec.source}: the {' and the '.join(changed)} changed since '{layout.root}' was started; its"
            f" {len(prior)} finished trial(s) were measured under the old one(s): resume with the original tune file"
            " (search, cache and references may change), or start a new --workdir"
        )


def _ray_init(address: str | None, layout: Layout) -> str | None:
    """Start local Ray (or attach); returns the Ray temp dir to remove afterwards (None when attached)."""
    import ray

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    env = (
        {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())}}
        if not address
        else None
    )
    if address:
        ray.init(address=address, **kwargs)
        return None
    # Ray's unix sockets need a short path (<108 bytes): inside the work dir when it is short, else a folder
    # under the system temp dir named after the work dir, so a resume after kill -9 reuses and then removes it
    tmp = layout.root / ".ray-tmp"
    if len(str(tmp)) > 40:
        tmp = Path(tempfile.gettempdir()) / f"edgepipe-ray-{hashlib.sha256(str(layout.root).encode()).hexdigest()[:12]}"
    tmp.mkdir(parents=True, exist_ok=True)
    # address="local": a new local Ray even when the environment names a cluster (RAY_ADDRESS), which --address is for
    ray.init(address="local", num_cpus=os.cpu_count() or 1, _temp_dir=str(tmp), runtime_env=env, **kwargs)
    return str(tmp)


def tune(
    config: str | Path | TuneSpec,
    *,
    workdir: str | Path,
    address: str | None = None,
    trials: int | None = None,
    time_budget_s: float | None = None,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    debug: bool = False,
) -> dict[str, Any]:
    """Search recipes per target and write ``<workdir>/tune/report.{md,json}``, plots and ``best-<target>.yaml``.

    Args:
        config: tune YAML path (or a parsed :class:`TuneSpec` loaded from a file).
        workdir: tune folder: ``trials/`` (one run folder per trial), ``cache/`` (shared stage cache unless
            ``cache.dir``), ``references/``, ``tune/`` (report, journal), ``ray/`` (Ray experiment state).
        address: attach to this Ray cluster (``auto`` or ``ray://HOST:PORT``) instead of starting local Ray.
        trials: override ``search.trials``.
        time_budget_s: stop starting trials after this many seconds (Ray Tune ``time_budget_s``).
        resume: continue the tune in ``workdir``; trials already in its journal are not run again.
        echo: where progress lines go (one per finished trial, with the best so far per target).
        debug: let Ray and Ray Tune log to the console; otherwise only their CRITICAL records reach it (their
            logs stay in the Ray session folder; see :func:`_quiet_ray`).

    SIGINT and SIGTERM stop the tune: trials in flight are abandoned (finished ones are in the journal, so
    ``resume`` continues), Ray is shut down and its temp folder removed, and ``KeyboardInterrupt`` is raised.

    Raises:
        ConfigError: a bad tune file or space (before Ray starts). MissingExtra: ray/optuna not installed.
    """
    spec = config if isinstance(config, TuneSpec) else load_tune(config)
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials: expected a number >= 1, got {trials}")
        if spec.search.algorithm == "grid":  # a grid has no more points than its size
            trials = min(trials, grid_size(spec.dimensions))
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"trials": trials})})
    from pipeline.preflight import preflight
    from pipeline.tune.check import check_trials

    check_trials(spec, preflight(spec.base, source=spec.source))  # every trial's schema, before Ray starts
    _require()
    source = str(Path(spec.source).resolve())  # Ray workers start in their own folders
    if not Path(source).is_file():
        raise EdgepipeError(f"{spec.source}: a tune must be loaded from a file (Ray workers re-read it)")
    layout = Layout(Path(workdir), spec)
    prior = read_journal(layout.journal)
    if prior and not resume:
        raise EdgepipeError(
            f"'{layout.root}' already holds a tune ({len(prior)} finished trials); pass --resume to continue it or choose another --workdir"
        )
    _check_same_tune(spec, layout, prior)
    for p in (layout.out, layout.trials, layout.cache, layout.ray):
        p.mkdir(parents=True, exist_ok=True)
    from pipeline.artifact import atomic_write_json

    atomic_write_json(layout.out / _IDENTITY, tune_identity(spec))
    remaining = max(0, spec.search.trials - len(prior))
    if prior:
        echo(f"edgepipe tune: resuming, {len(prior)} trial(s) finished, {remaining} to go")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    t0 = time.perf_counter()
    quiet = None if debug else _quiet_ray()
    _SIGNALS_SEEN.clear()
    ray_tmp = None
    handlers = _stop_on_signals()
    notices = contextlib.ExitStack()
    if not debug:
        notices.enter_context(_raylet_notices_off())
    try:
        ray_tmp = _ray_init(address, layout)
        _stop_on_signals()  # again: ray.init installs its own SIGTERM handler (sys.exit, mid-fit)
        from pipeline.tune.board import BoardBench, board_targets
        from targets import load_target

        profiles = {p.name: p for p in map(load_target, spec.base.targets)}
        boards = board_targets(list(profiles))
        bench_cfg: Any = next(s for s in spec.base.stages if s.kind == "benchmark")  # BenchmarkConfig
        board = BoardBench(boards, bench_cfg.runs, {n: profiles[n].threads or 1 for n in boards}) if boards else None
        if boards:
            echo(f"edgepipe tune: benchmarking on boards in the cluster: {', '.join(boards)}")
        if remaining:
            _fit(spec, source, layout, prior, remaining, time_budget_s, board, echo)
        from pipeline.tune.report import run_references, write_tune_report

        refs = run_references(spec, layout, board)
        report = write_tune_report(
            spec, layout, read_journal(layout.journal), refs, seconds=time.perf_counter() - t0, boards=boards
        )
    except KeyboardInterrupt:
        # name the signal (Ray may re-raise the interrupt from inside fit() without its message)
        raise KeyboardInterrupt(_SIGNALS_SEEN[-1] if _SIGNALS_SEEN else "SIGINT") from None
    finally:
        for sig in handlers:  # a second signal during the shutdown below would leave Ray half-stopped
            signal.signal(sig, signal.SIG_IGN)
        try:
            ray.shutdown()
            if ray_tmp and not address:
                shutil.rmtree(ray_tmp, ignore_errors=True)
        finally:
            _restore_signals(handlers)
            notices.close()
            if quiet is not None:
                for name, level in quiet.items():
                    logging.getLogger(name).setLevel(level)
    return report


# Ray's loggers that write to the console on their own (they do not propagate to edgepipe's handler)
_RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "ray._private", "ray.util")


def _quiet_ray() -> dict[str, int]:
    """Nothing below CRITICAL from Ray's own loggers in this process (its token-authentication notice at
    ``ray.init``, Ray Tune's "Trial task failed" tracebacks: edgepipe prints its own line per failed trial, naming
    the cause); returns the previous levels. Worker output does not reach the console (``log_to_driver=False``);
    the raylet's notices are dropped by :func:`_raylet_notices_off`."""
    old = {}
    for name in _RAY_LOGGERS:
        lg = logging.getLogger(name)
        old[name] = lg.level
        lg.setLevel(logging.CRITICAL)
    return old


@contextmanager
def _raylet_notices_off() -> Iterator[None]:
    """Ray's driver prints the raylet's error notices ("(raylet) A worker died or was killed ...", the memory
    monitor's report) to stdout from a background thread (``listen_error_messages`` -> ``print_to_stdstream``),
    bypassing logging. edgepipe prints its own line per lost worker with the cause, so these are dropped here
    (``--debug`` keeps them); other worker output is not printed anyway (``log_to_driver=False``)."""
    try:
        import ray._private.worker as rw

        orig = rw.print_to_stdstream
    except (ImportError, AttributeError):
        yield
        return

    def _print(data, *args, **kwargs):
        if data.get("pid") != "raylet":
            orig(data, *args, **kwargs)

    rw.print_to_stdstream = _print
    try:
        yield
    finally:
        rw.print_to_stdstream = orig


_SIGNALS_SEEN: list[str] = []


def _interrupt(signum: int, frame: Any) -> None:
    _SIGNALS_SEEN.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(_SIGNALS_SEEN[-1])


def _stop_on_signals() -> dict[int, Any]:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread (so ``finally`` shuts Ray down); returns
    the handlers it replaced ({} outside the main thread, where signals cannot be caught)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(handlers: dict[int, Any]) -> None:
    for sig, h in handlers.items():
        signal.signal(sig, h if h is not None else signal.SIG_DFL)


def _fit(
    spec: TuneSpec,
    source: str,
    layout: Layout,
    prior: list,
    remaining: int,
    time_budget_s: float | None,
    board: Any,
    echo: Callable[[str], None],
) -> None:
    import ray
    from ray import tune as rt

    best: dict[str, Any] = {}
    done = [len(prior)]
    for rec in prior:
        _line(rec, 0, 0, spec, best)  # seed best-so-far silently

    run_id = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # scopes the attempt ledgers to this invocation

    class _Progress(rt.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            raw = (trial.last_result or {}).get("record_json")
            if raw:
                done[0] += 1
                echo(_line(json.loads(raw), done[0], spec.search.trials, spec, best))

        def on_trial_recover(self, iteration, trials, trial, **info):
            # the trial's Ray worker died (Ray's memory monitor, the OOM killer, a crash): Tune starts it again
            params = _flat(trial.config)
            cause = worker_death_cause(_last_error(trial))
            note_lost_attempt(layout, params, run_id, cause)
            echo(
                f"edgepipe tune: retrying trial {params_key(params)[:8]}"
                f" [{' '.join(f'{k}={v}' for k, v in sorted(params.items()))}]: {cause}"
                f" (attempt {trial.num_failures + 1} of {1 + spec.search.retries})"
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            # Ray Tune gave up on the trial (its worker died on every allowed attempt): the journal records it
            params = _flat(trial.config)
            cause = worker_death_cause(_last_error(trial))
            rec = record_lost_trial(spec, params, layout, run_id, cause, attempts=trial.num_failures)
            done[0] += 1
            echo(_line(rec, done[0], spec.search.trials, spec, best))

    cpus = ray.cluster_resources().get("CPU", 1)
    concurrent = spec.search.max_concurrent or max(1, int(cpus // spec.search.cpus_per_trial))
    trainable = rt.with_resources(
        rt.with_parameters(_trainable, source=source, workdir=str(layout.root), board=board, run_id=run_id),
        {"cpu": spec.search.cpus_per_trial},
    )
    tuner = rt.Tuner(
        trainable,
        tune_config=rt.TuneConfig(
            search_alg=_searcher(spec, prior),
            num_samples=remaining,
            max_concurrent_trials=concurrent,
            time_budget_s=time_budget_s,
        ),
        run_config=rt.RunConfig(
            name=run_id,
            storage_path=str(layout.ray),
            verbose=0,
            callbacks=[_Progress()],
            # a trial whose worker died is started again in a new worker (its attempts are counted with the ones
            # its worker retried itself, see pipeline.tune.trial), then recorded as failed by on_trial_error
            failure_config=rt.FailureConfig(max_failures=spec.search.retries, fail_fast=False),
        ),
    )
    try:
        with _memory_monitor_kills_fail_the_trial():
            tuner.fit()
    except RuntimeError as exc:
        # only where the patch above could not be applied (another Ray): Ray Tune 2.60 ends the whole fit
        # (actor_manager: "Caught unexpected exception") when Ray's memory monitor kills a trial's worker
        if "low on memory" not in str(exc):
            raise
        raise EdgepipeError(
            "tune stopped: Ray killed a trial's worker because the machine ran low on memory"
            f" ({str(exc).split(': ', 1)[-1].splitlines()[0][:200]}); finished trials are kept: free memory or lower"
            " search.max_concurrent, then continue with --resume"
        ) from exc
