"""Shared pydantic plumbing: frozen, closed models and one-line error messages that name the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

__all__ = ["Frozen", "format_validation_error", "read_yaml"]


class Frozen(BaseModel):
    """Base for every config: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def format_validation_error(err: ValidationError, *, source: str, prefix: str = "") -> str:
    """One line per problem (first problem first): ``file: key.path: message``."""
    lines = []
    for e in err.errors():
        loc = _loc(tuple(e["loc"]))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "<root>" else prefix
        if e["type"] == "extra_forbidden":
            msg = f"unknown key '{e['loc'][-1]}'"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            msg = f"{e['msg']} (got {shown})"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` a file, turning I/O and syntax problems into one-line :class:`ConfigError`s."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
