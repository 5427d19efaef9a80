"""The ONNX-exporter registry: one entry per ``export.exporter``, read by :func:`exporters.onnx.export_onnx` and by
the ``export`` stage's config (its allowed values come from here, never from a word list).

An exporter is one file plus one registration::

    @register_exporter("my_exporter", description="...", check=refuse_what_it_cannot_export)
    def my_exporter(loaded: LoadedModel, opset: int, with_past: bool, workdir: Path) -> onnx.ModelProto: ...

The function returns the model (an ``onnx.ModelProto``, or an ``onnxscript.ir.Model``, whose weights
:func:`~exporters.onnx.export_onnx` can stream straight into external data) with optimum's IO names (inputs ``input_ids``, ``attention_mask``
[, ``token_type_ids``, ``position_ids``, ``past_key_values.{i}.key/value``]; outputs ``last_hidden_state`` /
``logits`` [+ ``present.{i}.key/value``]), dynamic batch and sequence axes, default-domain opset ``opset``;
``workdir`` is an empty scratch folder it may write into. :func:`~exporters.onnx.export_onnx` then normalises,
saves, checks and describes the proto, whichever exporter made it. ``check(loaded)`` runs before any work and
raises :class:`~exporters.onnx.ExportError` (one line) for a model the exporter cannot handle.

The built-in exporters (``dynamo``, ``optimum``) register in :mod:`exporters.onnx`. A leaf module: importing it
loads neither torch nor onnx.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.loaded import LoadedModel

__all__ = ["EXPORTERS", "ExporterSpec", "cross_check_exporter", "exporter_names", "exporter_spec", "register_exporter"]

# The modules whose import registers the built-in exporters: a new exporter is one file plus one line here.
_BUILTIN_MODULES = ("exporters.onnx",)

ExportFn = Callable[["LoadedModel", int, bool, Path], Any]  # -> onnx.ModelProto | onnxscript.ir.Model


@dataclass(frozen=True)
class ExporterSpec:
    """One registered exporter.

    Attributes:
        name: the ``exporter=`` value (and the YAML ``export.exporter`` value).
        fn: ``(loaded, opset, with_past, workdir) -> onnx.ModelProto | ir.Model``, see the module docstring.
        description: one line for docs and errors.
        check: ``(loaded) -> None``, raising ``ExportError`` for a model this exporter cannot export; or None.
    """

    name: str
    fn: ExportFn
    description: str
    check: Callable[[LoadedModel], None] | None = None


EXPORTERS: dict[str, ExporterSpec] = {}


def register_exporter(
    name: str, *, description: str, check: Callable[[LoadedModel], None] | None = None
) -> Callable[[ExportFn], ExportFn]:
    """Register ``fn`` as exporter ``name``; registering a different function under a taken name raises ValueError."""

    def deco(fn: ExportFn) -> ExportFn:
        if name in EXPORTERS and EXPORTERS[name].fn is not fn:
            raise ValueError(
                f"exporter '{name}' registered twice ({EXPORTERS[name].fn.__module__} and {fn.__module__})"
            )
        EXPORTERS[name] = ExporterSpec(name, fn, description, check)
        return fn

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def exporter_names() -> list[str]:
    """Registered exporter names in registration order (the built-ins first: ``dynamo``, ``optimum``)."""
    _load_builtins()
    return list(EXPORTERS)


def exporter_spec(name: str) -> ExporterSpec:
    """The registered exporter ``name``; ValueError naming the known exporters otherwise."""
    _load_builtins()
    if name not in EXPORTERS:
        raise ValueError(f"unknown exporter {name!r}; known: {', '.join(EXPORTERS)}")
    return EXPORTERS[name]


def cross_check_exporter(name: str) -> str:
    """The exporter ``export.cross_check`` compares ``name`` against: the first registered other one.

    Raises:
        ValueError: no other exporter is registered.
    """
    others = [n for n in exporter_names() if n != name]
    if not others:
        raise ValueError(f"cross_check needs a second exporter besides {name!r}; none is registered")
    return others[0]
