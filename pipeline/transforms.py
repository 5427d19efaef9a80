"""The module-transform registry: structural edits that edgepipe makes to a model (modules replaced by ones of
another shape), recorded in ``config.json`` under a key, and rebuilt by the loader through this registry.

A transform is one registration in the module that makes the edit::

    register_module_transform("edgepipe_my_edit", rebuild_my_edit_, description="...")

``rebuild(model, folder) -> int`` receives the model as transformers built it from ``config.json`` (loaded with
``ignore_mismatched_sizes=True``: the edited modules are freshly initialised at the original shapes), replaces the
edited modules as the record under ``key`` says, loads their weights from the folder's safetensors, and returns
the number of modules rebuilt; it raises ``ValueError`` (one line) on a malformed record or a shape mismatch.

The loader (:func:`pipeline.models.load_model`) consults only this registry; the built-in transforms register when
their modules are imported by :func:`load_builtin_transforms` (today: q/k widths narrowed by the prune stage,
:mod:`pipeline.pruning.qk_dims`, and bounded-entry attention, :mod:`pipeline.lowrank.bounded`). A leaf module: importing it loads neither torch nor any transform.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MODULE_TRANSFORMS",
    "ModuleTransform",
    "load_builtin_transforms",
    "recorded_transforms",
    "register_module_transform",
]

# The modules whose import registers the built-in transforms: a new one is one registration plus one line here.
_BUILTIN_MODULES = ("pipeline.pruning.qk_dims", "pipeline.lowrank.bounded")

Rebuild = Callable[[Any, Path], int]  # (model, folder) -> modules rebuilt


@dataclass(frozen=True)
class ModuleTransform:
    """One registered structural edit.

    Attributes:
        key: the ``config.json`` attribute that records it (present and non-empty = the model carries the edit).
        rebuild: ``(model, folder) -> int``, see the module docstring.
        description: one line for errors (e.g. an exporter that cannot load the edit).
        reshapes: the edit changes parameter shapes (the loader then builds the model with
            ``ignore_mismatched_sizes=True`` and the rebuild loads the edited modules' weights); False for an edit
            that only changes how modules compute (bounded-entry attention).
    """

    key: str
    rebuild: Rebuild
    description: str
    reshapes: bool = True


MODULE_TRANSFORMS: dict[str, ModuleTransform] = {}


def register_module_transform(key: str, rebuild: Rebuild, *, description: str, reshapes: bool = True) -> Rebuild:
    """Register ``rebuild`` for records under ``config.json`` key ``key``; a different function under a taken key
    raises ValueError. Returns ``rebuild``."""
    old = MODULE_TRANSFORMS.get(key)
    if old is not None and old.rebuild is not rebuild:
        raise ValueError(
            f"module transform '{key}' registered twice ({old.rebuild.__module__} and {rebuild.__module__})"
        )
    MODULE_TRANSFORMS[key] = ModuleTransform(key, rebuild, description, reshapes)
    return rebuild


def load_builtin_transforms() -> None:
    """Import the modules that register the built-in transforms (idempotent)."""
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def recorded_transforms(config: Any) -> list[ModuleTransform]:
    """The registered transforms a model ``config`` records (its key set and non-empty), in registration order."""
    load_builtin_transforms()
    return [t for t in MODULE_TRANSFORMS.values() if getattr(config, t.key, None)]
