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

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from pipeline.version import __version__
from pipeline.artifact import Artifact, atomic_write_json, hash_tree, replace_dir
from pipeline.config import PipelineConfig, coerce_config
from pipeline.errors import ConfigError, EdgepipeError, ModelInputError, StageError, ValidationFailed
from pipeline.stage import STAGES, StageConfig, StageContext

__all__ = ["run", "resolve_model_path", "STAGE_RECORD"]

log = logging.getLogger("edgepipe")
STAGE_RECORD = ".stage.json"


def resolve_model_path(cfg: PipelineConfig) -> Path:
    if cfg.model.path is None:
        from pipeline.models import default_model_path

        return Path(default_model_path()).resolve()
    p = Path(cfg.model.path)
    if not p.is_dir():
        raise ModelInputError(f"model.path: '{p}' is not a directory (give a local Hugging Face model folder)")
    if not (p / "config.json").is_file():
        raise ModelInputError(f"model.path: '{p}' has no config.json; is it a Hugging Face model folder?")
    return p.resolve()


def describe_model(path: Path, task: Optional[str]) -> tuple[str, str]:
    """(task, family) from the model folder's config.json, without loading weights or importing transformers
    (fails fast on bad input, and keeps a fully cached re-run quick)."""
    from types import SimpleNamespace

    from pipeline.models import ModelLoadError, check_weights, infer_task, model_family

    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelInputError(f"model.path: '{path}': cannot read config.json: {str(exc).splitlines()[0]}") from None
    conf = SimpleNamespace(**data)
    try:
        family = model_family(conf)
        check_weights(path)
        return task or infer_task(conf), family
    except ModelLoadError as exc:
        raise ModelInputError(f"model.path: {exc}") from None


@contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".edgepipe.lock", "w")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise EdgepipeError(f"another edgepipe run is using '{run_dir}'") from None
        yield
    finally:
        fh.close()


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def _clean_stale(run_dir: Path) -> None:
    """Remove temp folders/files left by a killed run (never trusted, never reused)."""
    for base in (run_dir, run_dir / "stages"):
        if not base.is_dir():
            continue
        for p in base.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".tmp")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "edgepipe": __version__}
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxscript", "numpy", "safetensors", "pydantic"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _input_fingerprint(cfg: PipelineConfig, model_path: Path, profiles: Mapping[str, Any]) -> dict[str, Any]:
    from pipeline.data import load_texts

    texts = load_texts(Path(cfg.calibration.file) if cfg.calibration.file else None)
    return {
        "model_sha256": hash_tree(model_path),
        "calibration_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        "profiles": {n: p.model_dump(mode="json") for n, p in profiles.items()},
    }


def run(
    config: Union[PipelineConfig, Mapping[str, Any], str, Path, None] = None,
    *,
    workdir: Union[str, Path] = "runs/latest",
    stages: Optional[Sequence[StageConfig]] = None,
    progress: bool = True,
    cache_dir: Union[str, Path, None] = None,
) -> dict[str, Any]:
    """Run a pipeline and return its report (also written to ``workdir/report.json``).

    Args:
        config: a :class:`PipelineConfig`, the same structure as a dict, a YAML path, or None for the default.
        workdir: the run folder; an unchanged re-run reuses every completed stage.
        stages: optional typed stage configs replacing ``config.stages`` (Python API convenience).
        progress: show progress bars.
        cache_dir: optional content-addressed stage cache shared with other runs (:mod:`pipeline.cache`):
            a stage whose key is there is copied in instead of run, and every stage this run completes is
            published there.

    Raises:
        ConfigError / ModelInputError / StageError: bad input, before or during a stage (exit code 2).
        ValidationFailed: a validation gate failed; the report was written first (exit code 1).
    """
    from pipeline import stages as _  # noqa: F401  (register built-in stages)
    from targets import load_target

    cfg = coerce_config(config, stages=stages)
    if not cfg.stages:
        raise ConfigError("stages: the pipeline has no stages")
    run_dir = Path(workdir).resolve()
    profiles: dict[str, Any] = {}
    for i, ref in enumerate(cfg.targets):
        prof = load_target(ref)  # a built-in name or a user's profile file: keyed by the profile's own name
        if prof.name in profiles:
            raise ConfigError(f"targets[{i}]: two targets are named '{prof.name}'")
        profiles[prof.name] = prof
    model_path = resolve_model_path(cfg)

    with _run_lock(run_dir):
        _clean_stale(run_dir)
        t_run = time.perf_counter()
        task, family = describe_model(model_path, cfg.model.task)
        fingerprint = _input_fingerprint(cfg, model_path, profiles)
        key = _digest(__version__, fingerprint, cfg.model_dump(mode="json", exclude={"stages"}), task, family)
        art = Artifact(model_dir=str(model_path), dense_dir=str(model_path), task=task, family=family)
        records: list[dict[str, Any]] = []
        stages_dir = run_dir / "stages"
        stages_dir.mkdir(exist_ok=True)
        n = len(cfg.stages)
        for i, scfg in enumerate(cfg.stages):
            spec = STAGES[scfg.kind]
            key = _digest(key, scfg.kind, spec.version, scfg.model_dump(mode="json"))
            name = f"{i + 1:02d}-{scfg.kind}"
            final = stages_dir / name
            record_path = final / STAGE_RECORD
            cached = None
            if record_path.is_file():
                try:
                    rec = json.loads(record_path.read_text())
                    if rec.get("key") == key:
                        cached = rec
                except (OSError, json.JSONDecodeError):
                    cached = None
            shared = ExitStack()
            if cached is None and cache_dir is not None:
                from pipeline import cache as stage_cache

                shared.enter_context(stage_cache.key_lock(Path(cache_dir), key))  # same key elsewhere: wait, then reuse
                cached = stage_cache.lookup(Path(cache_dir), key)
                if cached is not None:
                    tmp = stages_dir / f".{name}.tmp-{os.getpid()}"
                    shutil.rmtree(tmp, ignore_errors=True)
                    stage_cache.materialize(Path(cache_dir), key, tmp)
                    replace_dir(tmp, final)
                    shared.close()
            if cached is not None:
                art = Artifact.from_json(cached["artifact"])
                records.append({"name": scfg.kind, "folder": f"stages/{name}", "status": "cached", "seconds": cached["seconds"], "metrics": cached["metrics"]})
                log.info("[%d/%d] %s: cached", i + 1, n, scfg.kind)
                continue
            tmp = stages_dir / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            ctx = StageContext(dir=tmp, final_rel=f"stages/{name}", run_dir=run_dir, targets=profiles, run=cfg, index=i, progress=progress, log=logging.getLogger(f"edgepipe.{scfg.kind}"))
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
                raise StageError(scfg.kind, f"{type(exc).__name__}: {exc}") from exc
            seconds = round(time.perf_counter() - t0, 3)
            if not isinstance(new_art, Artifact):
                shared.close()
                raise StageError(scfg.kind, f"stage function returned {type(new_art).__name__}, not an Artifact")
            rec = {"key": key, "stage": scfg.kind, "config": scfg.model_dump(mode="json"), "seconds": seconds, "metrics": ctx.metrics, "artifact": new_art.to_json()}
            atomic_write_json(tmp / STAGE_RECORD, rec)
            replace_dir(tmp, final)
            if cache_dir is not None:
                stage_cache.publish(Path(cache_dir), key, final)
            shared.close()
            art = new_art
            records.append({"name": scfg.kind, "folder": f"stages/{name}", "status": "ran", "seconds": seconds, "metrics": ctx.metrics})
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
            manifest_extra={"versions": _package_versions(), "inputs": {"model_path": str(model_path), **{k: v for k, v in fingerprint.items() if k != "profiles"}}, "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}},
            seconds=time.perf_counter() - t_run,
        )
    if not report["ok"]:
        raise ValidationFailed(f"validation failed for {len(report['failures'])} check(s); see {run_dir / 'report.md'}", table=report.get("failure_table", ""))
    return report


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
