"""Model kinds edgepipe loads besides Hugging Face transformers: a registry keyed on ``config.json``'s ``model_type``.

A kind brings its own loader and saver (still: a local folder, ``config.json`` + safetensors, no code, no pickles)
and names its family and tasks. :mod:`pipeline.models` consults this registry before the transformers path; the
runner picks family-specific stage implementations registered with ``register_stage(..., family=...)``
(:mod:`pipeline.stage`). Built-in kinds register themselves when their module is imported by :func:`_builtin`
(one import line per kind).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.loaded import ModelKind

__all__ = ["MODEL_KINDS", "ModelKind", "kind_of_family", "model_kind", "model_kind_at", "register_model_kind"]


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Add ``kind`` under its ``model_type`` (an explicit string; registering a different kind twice is an error)."""
    old = MODEL_KINDS.get(kind.model_type)
    if old is not None and old != kind:
        raise ValueError(f"model_type '{kind.model_type}' registered twice")
    MODEL_KINDS[kind.model_type] = kind
    return kind


def _builtin() -> None:
    from pipeline.diffusion.kind import SCORE_MODEL_KIND  # edgepipe-score-mlp: GMM score networks

    register_model_kind(SCORE_MODEL_KIND)


def model_kind(model_type: Any) -> ModelKind | None:
    """The registered kind for a ``model_type``, or ``None`` (then it is a transformers model, or unsupported)."""
    _builtin()
    return MODEL_KINDS.get(model_type) if isinstance(model_type, str) else None


def kind_of_family(family: str) -> ModelKind | None:
    """The registered kind whose family is ``family``, or ``None``."""
    _builtin()
    return next((k for k in MODEL_KINDS.values() if k.family == family), None)


def model_kind_at(path: Any) -> ModelKind | None:
    """The registered kind named by ``path/config.json``, or ``None`` when there is none (or it is unreadable:
    the transformers path then reports the problem)."""
    try:
        data = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return model_kind(data.get("model_type")) if isinstance(data, dict) else None
