"""Stages: a frozen, typed config plus one registered function ``fn(artifact, config, ctx) -> artifact``.

Registry keys are explicit strings (the YAML key), never derived from class names.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.schema import Frozen

__all__ = [
    "FAMILY_STAGES",
    "STAGES",
    "RunPlan",
    "StageConfig",
    "StageContext",
    "StageSpec",
    "register_stage",
    "stage_for",
]


@dataclass(frozen=True)
class RunPlan:
    """What is known about a run before any weights load (for :meth:`StageConfig.check`).

    Args:
        run: the whole pipeline config.
        targets: the run's target profiles, by name, in config order.
        task / family: from the model folder's config.json (e.g. ``feature-extraction`` / ``bert``).
        passages: number of calibration passages available.
    """

    run: Any
    targets: Mapping[str, Any]
    task: str
    family: str
    passages: int


class StageConfig(Frozen):
    """Base of every stage config. Subclasses set ``kind`` (the YAML key) as a ClassVar.

    ``works_on`` places the stage in the pipeline, checked before anything runs: ``"torch"`` stages change the
    PyTorch model and must come before the (last) ``export``; ``"export"`` makes the ONNX models; ``"onnx"``
    stages (the default) need an earlier export; ``"any"`` stages have no place of their own (they read what is
    there, or need no model). ``path_fields`` name options that hold file paths: a relative path in a YAML file
    is taken from the YAML's folder, like ``model.path``.
    """

    kind: ClassVar[str] = ""
    works_on: ClassVar[str] = "onnx"
    path_fields: ClassVar[tuple[str, ...]] = ()

    def input_digest(self) -> str:
        """sha256 over the contents of the files named by ``path_fields`` (in order; a missing or unreadable file
        hashes as a marker, the stage reports it). The runner adds it to the stage's cache key, so editing such a
        file re-runs the stage."""
        h = hashlib.sha256()
        for f in self.path_fields:
            value = getattr(self, f)
            if isinstance(value, str):
                try:
                    with open(value, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            h.update(chunk)
                except OSError:
                    h.update(b"<unreadable>")
            h.update(b"\0")
        return h.hexdigest()

    def check(self, plan: RunPlan) -> None:
        """Config-level checks that need no weights (target capabilities, task). Raise ``ValueError`` with a
        one-line message; edgepipe adds the file and ``stages[i].kind``. Runs in ``edgepipe validate`` and
        before ``run`` starts any stage."""


@dataclass(frozen=True)
class StageSpec:
    kind: str
    config_cls: type[StageConfig]
    fn: Callable[..., Any]
    version: int
    description: str


STAGES: dict[str, StageSpec] = {}
# (stage kind, model family) -> the implementation for artifacts of that family (pipeline.families)
FAMILY_STAGES: dict[tuple[str, str], StageSpec] = {}


def register_stage(
    config_cls: type[StageConfig], *, version: int = 1, family: str | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the implementation of ``config_cls.kind``.

    ``version`` is part of the cache key: bump it when the stage's output changes for the same input.
    ``family``: register ``fn`` as that model family's implementation of an existing stage kind (same config
    class, so the YAML is unchanged); the runner picks it for artifacts of that family (:func:`stage_for`).
    """
    kind = config_cls.kind
    if not kind:
        raise TypeError(f"{config_cls.__name__} must set the ClassVar 'kind'")
    table, key = (STAGES, kind) if family is None else (FAMILY_STAGES, (kind, family))

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if key in table and table[key].fn is not fn:  # type: ignore[index]
            raise ValueError(f"stage {key!r} registered twice ({table[key].fn.__module__} and {fn.__module__})")  # type: ignore[index]
        doc = (fn.__doc__ or "").strip().splitlines()
        table[key] = StageSpec(kind, config_cls, fn, version, doc[0] if doc else "")  # type: ignore[index]
        return fn

    return deco


def stage_for(kind: str, family: str) -> StageSpec:
    """The implementation of stage ``kind`` for an artifact of ``family``: the family's own if registered."""
    return FAMILY_STAGES.get((kind, family)) or STAGES[kind]


@dataclass
class StageContext:
    """What a running stage may touch.

    Args:
        dir: the stage's private (temporary) output folder; a stage writes only here.
        final_rel: where ``dir`` will live, relative to the run folder, once the stage completes.
        run_dir: the run folder (to resolve paths of earlier artifacts).
        targets: the run's target profiles, by name, in config order.
        run: the whole pipeline config (seed, calibration settings, model).
        index: position of this stage in the pipeline (0-based).
        progress: whether to show progress bars.
    """

    dir: Path
    final_rel: str
    run_dir: Path
    targets: Mapping[str, Any]
    run: Any
    index: int
    progress: bool = True
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("edgepipe.stage"))
    metrics: dict[str, Any] = field(default_factory=dict)

    def ref(self, path: Path) -> str:
        """Run-relative reference for a file this stage wrote (valid after the stage completes)."""
        rel = Path(path).resolve().relative_to(self.dir.resolve())
        return f"{self.final_rel}/{rel.as_posix()}" if str(rel) != "." else self.final_rel

    def resolve(self, ref: str) -> Path:
        """Path of an earlier artifact's file from its run-relative reference."""
        return self.run_dir / ref

    def subdir(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p
