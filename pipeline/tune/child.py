"""One attempt of one trial: the trial's ``edgepipe run`` in its own process, started by the Ray worker.

``python -m pipeline.tune.child`` reads a JSON request on stdin (``source``: the tune file, ``params``, ``run_dir``,
``cache``, ``outcome``: where to write the result, ``attempt``: 1-based) and writes ``{"status", "reason"}``
(status ``ok`` / ``infeasible`` / ``failed``) atomically to ``outcome``. A process that dies (kernel OOM killer, a
segfault in a native library, kill -9) writes nothing; the worker, which survives, then sees the signal in the
exit status (:func:`pipeline.tune.trial.run_trial`). The child dies with the worker (``PR_SET_PDEATHSIG``), and
inherits its ``oom_score_adj`` (Ray sets 1000 on its workers), so the kernel's OOM killer takes the process that
holds the memory, the child, and not the worker.

Test hook (not a product option): ``EDGEPIPE_TEST_KILL_TRIAL`` holds a JSON list of rules
``{"match": {param: value, ...}, "attempts": [1, 2], "victim": "child" | "worker" | "memory", "mb": 1500}``.
When the trial's params contain ``match`` and its attempt is listed (all attempts when omitted), then as soon as
the pipeline's first stage has finished the process kills itself (``child``) or its Ray worker (``worker``) with
SIGKILL, a deterministic stand-in for the OOM killer, or (``memory``) takes ``mb`` MB and holds it for up to
two minutes, for Ray's memory monitor to act on (used by hand with ``RAY_memory_usage_threshold``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

TEST_KILL_ENV = "EDGEPIPE_TEST_KILL_TRIAL"
_PR_SET_PDEATHSIG = 1
_FIRST_STAGE_DONE = re.compile(r"^\[1/\d+\] \S+: (ran|cached)\b")


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the worker that started it dies (Linux; elsewhere Ray's own child cleanup)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the worker died before prctl: the signal will never come
        os._exit(1)


class _KillAfterFirstStage(logging.Handler):
    def __init__(self, rule: dict[str, Any]) -> None:
        super().__init__(logging.INFO)
        self.rule = rule

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "edgepipe" or not _FIRST_STAGE_DONE.match(record.getMessage()):
            return
        sys.stdout.flush()
        if self.rule.get("victim") == "memory":
            import time

            hold = bytearray(int(self.rule.get("mb", 1500)) * 2**20)
            for i in range(0, len(hold), 4096):  # touch every page: resident, not just reserved
                hold[i] = 1
            time.sleep(120)
            return
        if self.rule.get("victim") == "worker":
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)  # after the worker: its death would kill this one too (PDEATHSIG)


def _install_test_kill(params: dict[str, Any], attempt: int) -> None:
    raw = os.environ.get(TEST_KILL_ENV)
    if not raw:
        return
    for rule in json.loads(raw):
        if all(params.get(k) == v for k, v in rule["match"].items()) and attempt in rule.get("attempts", [attempt]):
            lg = logging.getLogger("edgepipe")
            lg.setLevel(logging.INFO)
            lg.addHandler(_KillAfterFirstStage(rule))
            print(f"test hook {TEST_KILL_ENV}: {rule.get('victim', 'child')} after the first stage", flush=True)
            return


def run_request(req: dict[str, Any]) -> dict[str, str]:
    """Run the trial's pipeline; the outcome, never an exception."""
    from pipeline.errors import EdgepipeError, ValidationFailed
    from pipeline.runner import run as run_pipeline
    from pipeline.tune.spec import apply_params, load_tune

    status, reason = "ok", ""
    try:
        cfg = apply_params(load_tune(req["source"]), req["params"])
        run_pipeline(cfg, workdir=req["run_dir"], progress=False, cache_dir=req["cache"])
    except ValidationFailed as exc:
        status, reason = "infeasible", str(exc).split(";")[0]
    except EdgepipeError as exc:
        status, reason = "failed", str(exc)
    except Exception as exc:  # a broken trial is a data point, not the end of the tune
        traceback.print_exc()  # into the trial's log
        status, reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return {"status": status, "reason": reason}


def main() -> int:
    parent = int(os.environ.get("EDGEPIPE_TRIAL_PARENT", "0") or 0)
    if parent:
        _die_with_parent(parent)
    req = json.loads(sys.stdin.read())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    logging.getLogger("edgepipe").setLevel(logging.WARNING)
    _install_test_kill(req["params"], int(req["attempt"]))
    out = run_request(req)
    from pipeline.artifact import atomic_write_json

    atomic_write_json(Path(req["outcome"]), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
