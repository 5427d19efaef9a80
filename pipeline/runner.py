"""Run a pipeline: stages in order, each cached by a hash of its inputs and config, then publish and report.

Layout of a run folder::

    runs/demo/
      manifest.json  report.json  report.md  plots/
      stages/01-export/ 02-quantize/ ...   # one numbered folder per stage (cache)
      host-cpu/  raspberry-pi-5/ ...       # per target: model (+ .ort), bundle/

A stage runs in a hidden temp folder and becomes visible by an atomic rename only after its completion
record is written, so a run killed at any point (even ``kill -9``) resumes from the last complete stage and
never trusts a half-written file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.artifact import Artifact, atomic_write_json, hash_tree, make_temp_dir, replace_dir
from pipeline.config import PipelineConfig, coerce_config
from pipeline.errors import ConfigError, EdgepipeError, StageError, ValidationFailed
from pipeline.preflight import preflight
from pipeline.stage import StageContext, stage_for
from pipeline.version import __version__
from pipeline.workdir import check_workdir, mark_folder

__all__ = ["STAGE_RECORD", "run"]

log = logging.getLogger("edgepipe")
STAGE_RECORD = ".stage.json"


def _own_path(run_dir: Path, name: str) -> Path:
    """``run_dir/name``, refusing a symbolic link planted there (edgepipe never writes through a link)."""
    p = run_dir / name
    if p.is_symlink():
        raise ConfigError(
            f"run folder '{run_dir}': '{name}' is a symbolic link; edgepipe does not write through links (remove it)"
        )
    return p


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Create (or reuse) the run folder, mark it as edgepipe's and hold its lock for the whole run.

    The lock file is opened without following links and without truncation, so a planted link cannot make
    edgepipe create or empty a file elsewhere."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        mark_folder(run_dir, "run")
        fd = os.open(run_dir / ".edgepipe.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"run folder '{run_dir}': .edgepipe.lock is a symbolic link; edgepipe does not write through links (remove it)"
            ) from None
        raise ConfigError(f"--workdir '{run_dir}': cannot be used: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgepipeError(f"another edgepipe run is using '{run_dir}'") from None
        yield
    finally:
        os.close(fd)


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1e")
    return h.hexdigest()


# names of edgepipe's own temp entries: ".NAME.tmp-XXXX" / ".NAME.old-PID" folders (make_temp_dir, replace_dir) and
# ".NAME.XXXXXXXX.tmp" files (atomic writes); nothing else is ever removed
_STALE = re.compile(r"\..+\.(tmp|old)-[A-Za-z0-9_]+|\..+\.[A-Za-z0-9_]{8}\.tmp")


def _clean_stale(run_dir: Path) -> None:
    """Remove temp folders/files left by a killed run (never trusted, never reused); links are removed, not
    followed."""
    for base in (run_dir, run_dir / "stages"):
        if base.is_symlink() or not base.is_dir():
            continue
        for p in base.iterdir():
            if _STALE.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "edgepipe": __version__}
    for name in (
        "torch",
        "transformers",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "numpy",
        "safetensors",
        "pydantic",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _input_fingerprint(texts: list[str], model_path: Path, profiles: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model_sha256": hash_tree(model_path),
        "calibration_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        # int8_weight_type is resolved here: `int8_weights: host` decides it from this machine's CPU, and a
        # cache shared by machines with and without VNNI must not hand one's artifact to the other
        "profiles": {
            n: {**p.model_dump(mode="json"), "int8_weight_type": p.int8_weight_type} for n, p in profiles.items()
        },
    }


def run(
    config: PipelineConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    workdir: str | Path = "runs/latest",
    stages: Sequence[Any] | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run a pipeline and return its report (also written to ``workdir/report.json``).

    Args:
        config: a :class:`PipelineConfig`, the same structure as a dict, a YAML path, or None for the default.
        workdir: the run folder; an unchanged re-run reuses every completed stage.
        stages: optional stages replacing ``config.stages``: typed stage configs or the YAML forms
            (``"export"``, ``{"export": {}}``).
        progress: show progress bars.
        cache_dir: optional content-addressed stage cache shared with other runs (:mod:`pipeline.cache`):
            a stage whose key is there is copied in instead of run, and every stage this run completes is
            published there.

    Every check that needs no weights (:func:`pipeline.preflight.preflight`, the same as ``edgepipe validate``)
    and the run folder's (:func:`pipeline.preflight.check_workdir`) pass before anything is written.

    Raises:
        ConfigError / ModelInputError / StageError: bad input, before or during a stage (exit code 2).
        ValidationFailed: a validation gate failed; the report was written first (exit code 1).
    """
    import pipeline.stages  # noqa: F401  (register built-in stages)

    cfg = coerce_config(config, stages=stages)
    source = (
        str(config)
        if isinstance(config, (str, Path))
        else ("<embedded default>" if config is None else "<python config>")
    )
    pre = preflight(cfg, source=source)
    profiles, model_path, task, family = pre.profiles, pre.model_path, pre.task, pre.family
    run_dir = check_workdir(workdir, model_path, cfg.calibration.file)

    with _run_lock(run_dir):
        _clean_stale(run_dir)
        t_run = time.perf_counter()
        fingerprint = _input_fingerprint(pre.texts, model_path, profiles)
        key = _digest(__version__, fingerprint, cfg.model_dump(mode="json", exclude={"stages"}), task, family)
        art = Artifact(model_dir=str(model_path), dense_dir=str(model_path), task=task, family=family)
        records: list[dict[str, Any]] = []
        stages_dir = _own_path(run_dir, "stages")
        stages_dir.mkdir(exist_ok=True)
        n = len(cfg.stages)
        for i, scfg in enumerate(cfg.stages):
            spec = stage_for(scfg.kind, art.family)
            key = _digest(key, scfg.kind, spec.version, scfg.model_dump(mode="json"))
            if scfg.path_fields:  # a stage whose config names input files: their content is part of the key
                key = _digest(key, scfg.input_digest())
            name = f"{i + 1:02d}-{scfg.kind}"
            final = stages_dir / name
            record_path = final / STAGE_RECORD
            cached = None
            if record_path.is_file() and not final.is_symlink() and not record_path.is_symlink():
                try:
                    rec = json.loads(record_path.read_text())
                    if rec.get("key") == key:
                        cached = rec
                except (OSError, json.JSONDecodeError):
                    cached = None
            shared = ExitStack()
            if cached is None and cache_dir is not None:
                import pipeline.cache as stage_cache

                shared.enter_context(stage_cache.key_lock(Path(cache_dir), key))  # same key elsewhere: wait, then reuse
                cached = stage_cache.lookup(Path(cache_dir), key)
                if cached is not None:
                    tmp = make_temp_dir(stages_dir, f".{name}.tmp-")
                    tmp.rmdir()  # materialize creates it
                    stage_cache.materialize(Path(cache_dir), key, tmp)
                    replace_dir(tmp, final)
                    shared.close()
            if cached is not None:
                art = Artifact.from_json(cached["artifact"])
                records.append(
                    {
                        "name": scfg.kind,
                        "folder": f"stages/{name}",
                        "status": "cached",
                        "seconds": cached["seconds"],
                        "metrics": cached["metrics"],
                    }
                )
                log.info("[%d/%d] %s: cached", i + 1, n, scfg.kind)
                continue
            tmp = make_temp_dir(stages_dir, f".{name}.tmp-")
            ctx = StageContext(
                dir=tmp,
                final_rel=f"stages/{name}",
                run_dir=run_dir,
                targets=profiles,
                run=cfg,
                index=i,
                progress=progress,
                log=logging.getLogger(f"edgepipe.{scfg.kind}"),
            )
            log.info("[%d/%d] %s: running", i + 1, n, scfg.kind)
            _seed_everything(cfg.seed + i)
            t0 = time.perf_counter()
            try:
                new_art = spec.fn(art, scfg, ctx)
            except EdgepipeError:
                shutil.rmtree(tmp, ignore_errors=True)
                shared.close()
                raise
            except Exception as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                shared.close()
                # first line only: some libraries put whole graph dumps in their messages (--debug shows all)
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                raise StageError(scfg.kind, f"{type(exc).__name__}: {first}") from exc
            seconds = round(time.perf_counter() - t0, 3)
            if not isinstance(new_art, Artifact):
                shared.close()
                raise StageError(scfg.kind, f"stage function returned {type(new_art).__name__}, not an Artifact")
            rec = {
                "key": key,
                "stage": scfg.kind,
                "config": scfg.model_dump(mode="json"),
                "seconds": seconds,
                "metrics": ctx.metrics,
                "artifact": new_art.to_json(),
            }
            atomic_write_json(tmp / STAGE_RECORD, rec)
            replace_dir(tmp, final)
            if cache_dir is not None:
                stage_cache.publish(Path(cache_dir), key, final)
            shared.close()
            art = new_art
            records.append(
                {
                    "name": scfg.kind,
                    "folder": f"stages/{name}",
                    "status": "ran",
                    "seconds": seconds,
                    "metrics": ctx.metrics,
                }
            )
            log.info("[%d/%d] %s: ran in %.1f s", i + 1, n, scfg.kind, seconds)

        from pipeline.report import publish_targets, write_reports

        published = publish_targets(art, run_dir, list(profiles))
        report = write_reports(
            run_dir=run_dir,
            cfg=cfg,
            target_names=list(profiles),
            art=art,
            records=records,
            published=published,
            manifest_extra={
                "versions": _package_versions(),
                "inputs": {"model_path": str(model_path), **{k: v for k, v in fingerprint.items() if k != "profiles"}},
                "host": {
                    "machine": platform.machine(),
                    "system": platform.system(),
                    "cpus": os.cpu_count(),
                    "python": sys.version.split()[0],
                },
            },
            seconds=time.perf_counter() - t_run,
        )
    if not report["ok"]:
        raise ValidationFailed(
            f"validation failed for {len(report['failures'])} check(s); see {run_dir / 'report.md'}",
            table=report.get("failure_table", ""),
        )
    return report


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
