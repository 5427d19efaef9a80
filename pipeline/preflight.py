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

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from pipeline.errors import ConfigError, ModelInputError, TargetError
from pipeline.schema import shown
from pipeline.stage import RunPlan

__all__ = ["Preflight", "preflight", "check_workdir", "RUN_MARKER"]

#: file that marks a folder as an edgepipe run folder (created by edgepipe; a non-empty folder without it is
#: never written to)
RUN_MARKER = ".edgepipe-run"


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
    from pipeline.model_folder import ModelFolderError, _load_json, check_config_fields, has_tokenizer_files
    from pipeline.families import model_kind
    from pipeline.models import ModelLoadError, check_weights, default_model_path, family_tasks, infer_task, model_family

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
        task = cfg.model.task or infer_task(SimpleNamespace(model_type=data["model_type"], architectures=data.get("architectures")))
        if task not in family_tasks(family):
            raise ModelLoadError(f"task {task!r} is not supported for {data['model_type']!r} (family {family!r} supports {', '.join(family_tasks(family))})")
        check_weights(p)
    except (ModelLoadError, ModelFolderError) as exc:
        raise ModelInputError(f"{where}: {str(exc).replace(str(p) + '/', '').replace(str(p) + ': ', '')}") from None
    if model_kind(data.get("model_type")) is not None:  # a registered non-text kind (e.g. a score network): no tokenizer
        return p.resolve(), task, family
    has_tok = has_tokenizer_files(p)
    if cfg.model.tokenizer and not has_tok:
        raise ModelInputError(f"{where} has no tokenizer files (tokenizer.json, vocab.txt, ...); add them, or set model.tokenizer: false"
                              " if the model has none (edgepipe then feeds hashed word ids and ships no tokenizer)")
    if not cfg.model.tokenizer and has_tok:
        raise ConfigError(f"{source}: model.tokenizer: false, but '{p}' has tokenizer files; remove the key to use them")
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
        raise ConfigError(f"{source}: calibration: {where} has {len(texts)} passages but samples ({c.samples}) + heldout ({c.heldout}) = {need} are needed")
    return texts


def _stage_order(cfg: Any, source: str) -> None:
    exports = [i for i, s in enumerate(cfg.stages) if s.works_on == "export"]
    last_export = exports[-1] if exports else None
    for i, s in enumerate(cfg.stages):
        where = f"{source}: stages[{i}].{s.kind}"
        if s.works_on == "onnx" and not any(e < i for e in exports):
            raise ConfigError(f"{where}: needs an ONNX model; put an 'export' stage before '{s.kind}'")
        if s.works_on == "torch" and last_export is not None and i > last_export:
            raise ConfigError(f"{where}: changes the PyTorch model after the last 'export', so the published models would not"
                              f" include it; put '{s.kind}' before 'export'")


def preflight(cfg: Any, *, source: str = "<config>") -> Preflight:
    """Run every check that needs no weights (see the module doc); raise the first problem as one line.

    Raises:
        ConfigError / TargetError / ModelInputError: bad input (exit code 2).
    """
    from pipeline import stages as _  # noqa: F401  (register built-in stages)

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


def folder_kind(run_dir: Path) -> str:
    """What made an edgepipe folder: the ``kind`` in its :data:`RUN_MARKER` ("run" when the marker names none)."""
    try:
        data = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "run"
    kind = data.get("kind", "run") if isinstance(data, dict) else "run"
    return kind if isinstance(kind, str) else "run"


def mark_folder(run_dir: Path, kind: str = "run") -> None:
    """Write :data:`RUN_MARKER` into ``run_dir`` (once): edgepipe owns the folder and may replace anything in it."""
    from pipeline.artifact import atomic_write_text
    from pipeline.version import __version__

    if not (run_dir / RUN_MARKER).is_file():
        atomic_write_text(run_dir / RUN_MARKER, json.dumps(
            {"edgepipe": __version__, "kind": kind, "what": f"edgepipe {kind} folder; edgepipe may replace anything in it"}) + "\n")


def check_workdir(workdir: Any, model_path: Optional[Path], calibration: Optional[str] = None, *, kind: str = "run") -> Path:
    """The run folder, resolved, after checking edgepipe may use it: not empty text, not the model folder or
    inside it, not a file or below one, writable, and either absent, empty or an edgepipe run folder (holding
    :data:`RUN_MARKER`). Creates nothing.

    Raises:
        ConfigError: naming ``--workdir`` and the reason.
    """
    if workdir is None or not str(workdir).strip():
        raise ConfigError("--workdir: empty path; give a folder for the run (e.g. runs/my-model)")
    if "\0" in str(workdir):
        raise ConfigError("--workdir: contains a NUL character")
    raw = Path(os.path.expanduser(str(workdir)))
    run_dir = raw.resolve()
    where = f"--workdir '{shown(str(raw), 200)[1:-1]}'"
    if model_path is not None:
        m = Path(model_path).resolve()
        if run_dir == m or m in run_dir.parents:
            raise ConfigError(f"{where}: is inside the model folder '{m}'; edgepipe never writes into a model folder")
        if run_dir in m.parents:
            raise ConfigError(f"{where}: holds the model folder '{m}'; choose a separate run folder")
    if calibration is not None and run_dir in Path(calibration).resolve().parents:
        raise ConfigError(f"{where}: holds calibration.file '{calibration}'; choose a separate run folder")
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise ConfigError(f"{where}: is a file, not a folder")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: is not writable")
        marker = run_dir / RUN_MARKER
        if marker.is_symlink() or (marker.exists() and not marker.is_file()):
            raise ConfigError(f"{where}: {RUN_MARKER} is not a plain file; refusing to use this folder")
        if not marker.is_file() and any(run_dir.iterdir()):
            raise ConfigError(f"{where}: exists, is not empty and is not an edgepipe run folder (no {RUN_MARKER});"
                              " edgepipe never writes into other folders: give a new or empty folder")
        if marker.is_file() and folder_kind(run_dir) != kind:
            raise ConfigError(f"{where}: holds the results of an edgepipe {folder_kind(run_dir)}, not of a {kind};"
                              " give a new or empty folder")
        return run_dir
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{where}: '{parent}' is a file, so the folder cannot be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot be created: '{parent}' is not writable")
    return run_dir
