"""Every check of a run that needs no model weights. ``edgepipe validate`` and ``run`` call the same
:func:`preflight` before anything runs, so ``validate`` saying OK means ``run`` will not refuse the config.

Checked, each failure one line naming the file, key and stage (exit code 2):

- the pipeline has stages, in a working order (``works_on`` of each stage: PyTorch stages before the last
  export, ONNX stages after an export);
- every target resolves to a profile, names are unique;
- ``model.path``: a readable Hugging Face folder with a well-typed config.json of a supported family, no
  ``auto_map`` (no code from the folder), safetensors weights only, a tokenizer unless ``model.tokenizer: false``;
- ``calibration.file``: a readable UTF-8 text file with enough non-blank passages;
- each stage's own config-level checks (:meth:`pipeline.stage.StageConfig.check`: target capabilities such as
  the precision a target runs, ``per_target`` names, opsets, task-specific options);
- for ``run``: the run folder (:func:`check_workdir`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.errors import ConfigError, ModelInputError, TargetError
from pipeline.schema import shown
from pipeline.stage import RunPlan
from pipeline.workdir import RUN_MARKER, check_workdir, folder_kind, mark_folder  # noqa: F401  (re-exported)

__all__ = ["RUN_MARKER", "Preflight", "check_workdir", "preflight"]


@dataclass(frozen=True)
class Preflight:
    """What the checks established: the targets' profiles by name, the model folder, task and family, the
    calibration passages."""

    cfg: Any
    profiles: dict[str, Any]
    model_path: Path
    task: str
    family: str
    texts: list[str]


def _profiles(cfg: Any, source: str) -> dict[str, Any]:
    from targets import load_target

    profiles: dict[str, Any] = {}
    for i, ref in enumerate(cfg.targets):
        try:
            prof = load_target(ref)  # a built-in name or a user's profile file: keyed by the profile's own name
        except TargetError as exc:
            raise TargetError(f"{source}: targets[{i}]: {exc}") from None
        if prof.name in profiles:
            raise ConfigError(f"{source}: targets[{i}]: two targets are named '{prof.name}'")
        profiles[prof.name] = prof
    return profiles


def _model(cfg: Any, source: str) -> tuple[Path, str, str]:
    """(folder, task, family) from config.json and the folder's listing, without reading weights or importing
    transformers."""
    from pipeline.families import model_kind
    from pipeline.model_folder import ModelFolderError, _load_json, check_config_fields, has_tokenizer_files
    from pipeline.models import (
        ModelLoadError,
        check_weights,
        default_model_path,
        family_tasks,
        infer_task,
        model_family,
    )

    p = Path(cfg.model.path) if cfg.model.path is not None else Path(default_model_path())
    where = f"{source}: model.path: '{shown(str(p), 200)[1:-1]}'"
    if not p.is_dir():
        raise ModelInputError(f"{where} is not a directory (give a local Hugging Face model folder)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ModelInputError(f"{where} cannot be read (permission denied)")
    if not (p / "config.json").is_file():
        raise ModelInputError(f"{where} has no config.json; is it a Hugging Face model folder?")
    try:
        data = _load_json(p / "config.json")
        if not isinstance(data, dict):
            raise ModelFolderError(f"expected a JSON object, got {type(data).__name__}")
    except ModelFolderError as exc:
        raise ModelInputError(f"{where}: cannot read config.json: {str(exc).split(': ', 1)[-1]}") from None
    try:
        family = model_family(SimpleNamespace(model_type=data.get("model_type")))
        check_config_fields(data, "config.json")
        task = cfg.model.task or infer_task(
            SimpleNamespace(model_type=data["model_type"], architectures=data.get("architectures"))
        )
        if task not in family_tasks(family):
            raise ModelLoadError(
                f"task {task!r} is not supported for {data['model_type']!r} (family {family!r} supports {', '.join(family_tasks(family))})"
            )
        check_weights(p)
    except (ModelLoadError, ModelFolderError) as exc:
        raise ModelInputError(f"{where}: {str(exc).replace(str(p) + '/', '').replace(str(p) + ': ', '')}") from None
    if (
        model_kind(data.get("model_type")) is not None
    ):  # a registered non-text kind (e.g. a score network): no tokenizer
        return p.resolve(), task, family
    has_tok = has_tokenizer_files(p)
    if cfg.model.tokenizer and not has_tok:
        raise ModelInputError(
            f"{where} has no tokenizer files (tokenizer.json, vocab.txt, ...); add them, or set model.tokenizer: false"
            " if the model has none (edgepipe then feeds hashed word ids and ships no tokenizer)"
        )
    if not cfg.model.tokenizer and has_tok:
        raise ConfigError(
            f"{source}: model.tokenizer: false, but '{p}' has tokenizer files; remove the key to use them"
        )
    return p.resolve(), task, family


def _calibration(cfg: Any, source: str) -> list[str]:
    from pipeline.data import builtin_calibration_texts, load_texts

    c = cfg.calibration
    if c.file is None:
        texts = builtin_calibration_texts()
        where = "the built-in calibration text"
    else:
        try:
            texts = load_texts(Path(c.file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{source}: calibration.file: {str(exc).splitlines()[0]}") from None
        where = f"'{c.file}'"
    need = c.samples + c.heldout
    if len(texts) < need:
        raise ConfigError(
            f"{source}: calibration: {where} has {len(texts)} passages but samples ({c.samples}) + heldout ({c.heldout}) = {need} are needed"
        )
    return texts


def _stage_order(cfg: Any, source: str) -> None:
    exports = [i for i, s in enumerate(cfg.stages) if s.works_on == "export"]
    last_export = exports[-1] if exports else None
    for i, s in enumerate(cfg.stages):
        where = f"{source}: stages[{i}].{s.kind}"
        if s.works_on == "onnx" and not any(e < i for e in exports):
            raise ConfigError(f"{where}: needs an ONNX model; put an 'export' stage before '{s.kind}'")
        if s.works_on == "torch" and last_export is not None and i > last_export:
            raise ConfigError(
                f"{where}: changes the PyTorch model after the last 'export', so the published models would not"
                f" include it; put '{s.kind}' before 'export'"
            )


def preflight(cfg: Any, *, source: str = "<config>") -> Preflight:
    """Run every check that needs no weights (see the module doc); raise the first problem as one line.

    Raises:
        ConfigError / TargetError / ModelInputError: bad input (exit code 2).
    """
    import pipeline.stages  # noqa: F401  (register built-in stages)

    if not cfg.stages:
        raise ConfigError(f"{source}: stages: the pipeline has no stages (e.g. stages: [export, validate])")
    _stage_order(cfg, source)
    profiles = _profiles(cfg, source)
    model_path, task, family = _model(cfg, source)
    texts = _calibration(cfg, source)
    plan = RunPlan(run=cfg, targets=profiles, task=task, family=family, passages=len(texts))
    for i, s in enumerate(cfg.stages):
        try:
            s.check(plan)
        except ValueError as exc:
            raise ConfigError(f"{source}: stages[{i}].{s.kind}: {str(exc).splitlines()[0]}") from None
    return Preflight(cfg=cfg, profiles=profiles, model_path=model_path, task=task, family=family, texts=texts)
