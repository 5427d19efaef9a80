"""The run folder: which folders edgepipe may write into, and the marker that makes a folder edgepipe's.

Used by ``edgepipe run`` (pipeline.runner), ``edgepipe validate --workdir`` and ``edgepipe compile-program``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.schema import shown

__all__ = ["RUN_MARKER", "check_workdir", "folder_kind", "mark_folder"]

#: file that marks a folder as edgepipe's (created by edgepipe; a non-empty folder without it is never written to)
RUN_MARKER = ".edgepipe-run"


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
        atomic_write_text(
            run_dir / RUN_MARKER,
            json.dumps(
                {
                    "edgepipe": __version__,
                    "kind": kind,
                    "what": f"edgepipe {kind} folder; edgepipe may replace anything in it",
                }
            )
            + "\n",
        )


def check_workdir(workdir: Any, model_path: Path | None, calibration: str | None = None, *, kind: str = "run") -> Path:
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
            raise ConfigError(
                f"{where}: exists, is not empty and is not an edgepipe run folder (no {RUN_MARKER});"
                " edgepipe never writes into other folders: give a new or empty folder"
            )
        if marker.is_file() and folder_kind(run_dir) != kind:
            raise ConfigError(
                f"{where}: holds the results of an edgepipe {folder_kind(run_dir)}, not of a {kind};"
                " give a new or empty folder"
            )
        return run_dir
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{where}: '{parent}' is a file, so the folder cannot be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: cannot be created: '{parent}' is not writable")
    return run_dir
