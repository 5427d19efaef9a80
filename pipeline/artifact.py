"""The artifact that flows from stage to stage, and the atomic file helpers every stage uses.

An artifact is plain data (JSON-serializable) that points at files by run-relative references, so a
completed stage can be reloaded from disk (cache/resume) without recomputing anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Artifact",
    "TargetModel",
    "atomic_copy",
    "atomic_write_json",
    "atomic_write_text",
    "hash_file",
    "hash_tree",
    "make_temp_dir",
    "replace_dir",
    "temp_file_near",
]


@dataclass(frozen=True)
class TargetModel:
    """The ONNX model for one target, as the stages have made it so far."""

    model: str  # run-relative path of the .onnx file
    precision: str = "fp32"
    io: Mapping[str, Any] = field(default_factory=dict)  # exporter facts: input/output names, with_past, layers, ...
    files: Mapping[str, str] = field(
        default_factory=dict
    )  # extra run-relative files (ort, required ops config, bundle)
    metrics: Mapping[str, Any] = field(default_factory=dict)  # parity, fidelity, latency_ms, peak_rss_mb, ...


@dataclass(frozen=True)
class Artifact:
    """What one stage hands to the next.

    Args:
        model_dir: run-relative (or absolute, for the input model) Hugging Face directory of the PyTorch model.
        dense_dir: absolute path of the original, unmodified model (the fidelity reference).
        task / family: e.g. ``feature-extraction`` / ``bert``.
        targets: per-target ONNX models, once exported.
        torch_changes: what stages changed in the PyTorch model (pruning, attention kernel), for the report.
    """

    model_dir: str
    dense_dir: str
    task: str
    family: str
    targets: Mapping[str, TargetModel] = field(default_factory=dict)
    torch_changes: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> Artifact:
        return dataclasses.replace(self, **changes)

    def with_target(self, name: str, tm: TargetModel) -> Artifact:
        return self.replace(targets={**self.targets, name: tm})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Artifact:
        targets = {k: TargetModel(**v) for k, v in data.get("targets", {}).items()}
        return cls(**{**data, "targets": targets})


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_near(path: Path) -> Path:
    """A new, unpredictably named temp file beside ``path`` (O_EXCL: never an existing file or a planted link),
    with the mode an ordinary new file gets (0644 under umask 022), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, unpredictably named folder ``parent/<prefix>XXXXXXXX`` (never an existing one or a planted link),
    with an ordinary folder's mode (0755 under umask 022)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder + ``os.replace`` (never half-written)."""
    tmp = temp_file_near(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = temp_file_near(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Make the finished folder ``tmp`` visible as ``final``; a previous ``final`` is removed only after the
    rename, so a crash at any point leaves either the old complete folder or the new one (plus hidden debris
    that the runner cleans up), never a half-written one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def hash_file(path: Path, h: hashlib._Hash | None = None) -> str:
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if own else ""


def hash_tree(root: Path) -> str:
    """Content hash of every file under ``root`` (names and bytes, sorted; hidden files skipped)."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(
        q
        for q in root.rglob("*")
        if q.is_file() and not any(part.startswith(".") for part in q.relative_to(root).parts)
    ):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        hash_file(p, h)
        h.update(b"\0")
    return h.hexdigest()
