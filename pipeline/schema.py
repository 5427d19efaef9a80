"""Shared pydantic plumbing: frozen, closed models and one-line error messages that name the key path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

__all__ = [
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "Frozen",
    "did_you_mean",
    "format_validation_error",
    "read_yaml",
    "safe_yaml_load",
    "shown",
]

MAX_YAML_BYTES = 1 << 20  # a config or profile is a few hundred bytes; 1 MiB leaves room and bounds the work
MAX_YAML_DEPTH = 32  # nesting of mappings/sequences; edgepipe's own schema needs 4


class Frozen(BaseModel):
    """Base for every config: immutable, unknown keys rejected, NaN/inf refused for every float field."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def shown(value: Any, limit: int = 60) -> str:
    """``repr`` of user data for an error message, bounded: containers by their type, long text cut.

    Never formats an unbounded structure (a YAML alias bomb expands to billions of items)."""
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
        return repr(value) + "..."
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors/aliases (no alias bombs, no merge keys), duplicate mapping keys
    and nesting deeper than :data:`MAX_YAML_DEPTH` (no RecursionError), each with the line and column."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&, *) are not allowed in edgepipe files", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class reports it
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shown(key)}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_yaml_map)


def safe_yaml_load(text: str, source: str) -> Any:
    """Parse YAML text with :class:`_StrictLoader`; problems become one-line :class:`ConfigError`s naming ``source``."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{source}: file is larger than {MAX_YAML_BYTES // 1024} KiB; not an edgepipe config")
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None
    except RecursionError:  # belt and braces: the depth cap should make this unreachable
        raise ConfigError(f"{source}: malformed YAML: nested too deeply") from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        part = part if isinstance(part, int) else str(part)[:60]
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<root>"


def did_you_mean(word: Any, allowed: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed key (``difflib.get_close_matches``, cutoff 0.6), or ''."""
    import difflib

    if not isinstance(word, str):
        return ""
    near = difflib.get_close_matches(word, [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (``Model``, ``Model | None``, ``list[Model]``), if any."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        got = _model_in(arg)
        if got is not None:
            return got
    return None


def _keys_at(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at ``path`` (an error's ``loc`` without its last part) below ``model``."""
    cur = model
    for part in path:
        if isinstance(part, int):
            continue  # a list index: same model
        if cur is None or part not in cur.model_fields:
            return []
        cur = _model_in(cur.model_fields[part].annotation)
    if cur is None:
        return []
    return [f.alias or name for name, f in cur.model_fields.items()]


def format_validation_error(
    err: ValidationError, *, source: str, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    """One line per problem (first problem first): ``file: key.path: message``.

    With ``model`` (the class that was validated), an unknown key names the closest allowed one:
    ``unknown key 'sparsty' (did you mean 'sparsity'?)``.
    """
    lines = []
    for e in err.errors():
        loc = _loc(tuple(e["loc"]))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "<root>" else prefix
        if e["type"] == "extra_forbidden":
            key = e["loc"][-1]
            msg = f"unknown key '{str(key)[:60]}'" + did_you_mean(key, _keys_at(model, tuple(e["loc"][:-1])))
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")[:200]
            msg = (
                msg if "got " in msg else f"{msg} (got {shown(e.get('input'))})"
            )  # no second "got" when the message has one
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def read_yaml(path: Path) -> Any:
    """Read a YAML file strictly (:func:`safe_yaml_load`), turning I/O and syntax problems into one-line :class:`ConfigError`s."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: file is larger than {MAX_YAML_BYTES // 1024} KiB; not an edgepipe config")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return safe_yaml_load(text, str(path))
