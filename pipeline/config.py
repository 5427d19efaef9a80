"""The pipeline config: YAML (or the same structure as Python data) -> :class:`PipelineConfig`.

Everything is checked before any model loads: unknown keys, wrong types, unknown stage kinds and unknown
targets each produce one line naming the file, the key path and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from pipeline.errors import ConfigError, TargetError
from pipeline.schema import Frozen, did_you_mean, format_validation_error, read_yaml, shown
from pipeline.stage import STAGES, StageConfig

__all__ = [
    "DEFAULT_TARGETS",
    "CalibrationConfig",
    "ModelConfig",
    "PipelineConfig",
    "default_config",
    "load_config",
    "parse_config",
]

DEFAULT_TARGETS = ("host-cpu", "raspberry-pi-5", "jetson-orin-nano", "android-arm64")


class ModelConfig(Frozen):
    path: str | None = Field(
        None, description="local Hugging Face model directory; omitted = the packaged all-MiniLM-L6-v2"
    )
    task: str | None = Field(
        None,
        description="what the model is used for (pipeline.models.known_tasks()); inferred from the config when omitted",
    )
    tokenizer: bool = Field(
        True,
        description="false: the model has no tokenizer (edgepipe then feeds hashed word ids); true: the folder must hold one",
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        from pipeline.models import known_tasks

        if v is not None and v not in known_tasks():
            raise ValueError(f"unknown task {v!r}; expected one of: {', '.join(known_tasks())}")
        return v


class CalibrationConfig(Frozen):
    file: str | None = Field(None, description="text file, one passage per line; omitted = edgepipe's built-in text")
    samples: int = Field(64, ge=1, description="passages used for calibration (pruning, static int8)")
    heldout: int = Field(64, ge=4, description="further passages held out for validation and fidelity")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per passage")
    batch_size: int = Field(8, ge=1)


class PipelineConfig(Frozen):
    """A whole run. ``stages`` holds typed stage configs; YAML gives them as ``[{kind: {...}}, ...]``."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    seed: int = Field(0, ge=0, lt=2**32, description="random seed (numpy, torch, python); 0 <= seed < 2**32")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    stages: list[StageConfig] = Field(default_factory=list)

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, v: list[str]) -> list[str]:
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"targets listed twice: {dup}")
        return v

    def stage_items(self, *, as_written: bool = False) -> list[dict[str, Any]]:
        """The YAML form of ``stages``: ``[{kind: {...}}]``; ``as_written``: only the options that were set, so
        that options whose omission means something (e.g. prune's ``structured_unit``) stay omitted."""
        return [{s.kind: s.model_dump(mode="json", exclude_unset=as_written)} for s in self.stages]

    def to_data(self, *, as_written: bool = False) -> dict[str, Any]:
        """The config as YAML data (every option; ``as_written``: stages with only their set options)."""
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = self.stage_items(as_written=as_written)
        return data


def _registered() -> Mapping[str, Any]:
    import pipeline.stages  # noqa: F401  (registers the built-in stages)

    return STAGES


def _parse_stages(items: Any, source: str) -> list[StageConfig]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{source}: stages: expected a list of {{stage: config}} items, got {type(items).__name__}")
    registry = _registered()
    out: list[StageConfig] = []
    for i, item in enumerate(items):
        where = f"{source}: stages[{i}]"
        if isinstance(item, StageConfig):
            out.append(item)
            continue
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{where}: expected one mapping {{stage_kind: config}}, got {shown(item)}")
        ((kind, body),) = item.items()
        if not isinstance(kind, str) or kind not in registry:
            raise ConfigError(
                f"{where}: unknown stage {shown(kind)}{did_you_mean(kind, registry)}; known stages:"
                f" {', '.join(sorted(registry))}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{where}.{kind}: expected a mapping of options, got {type(body).__name__}")
        try:
            out.append(registry[kind].config_cls.model_validate(body))
        except ValidationError as exc:
            raise ConfigError(
                format_validation_error(
                    exc, source=source, prefix=f"stages[{i}].{kind}", model=registry[kind].config_cls
                )
            ) from None
    return out


def parse_config(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> PipelineConfig:
    """Validate config data (a mapping as read from YAML, or a :class:`PipelineConfig`).

    Relative ``model.path``, ``calibration.file`` and profile paths in ``targets`` are resolved against
    ``base_dir`` (the YAML's folder).
    """
    if isinstance(data, PipelineConfig):
        cfg = data
    else:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        stages = _parse_stages(data.pop("stages", None), source)
        try:
            cfg = PipelineConfig.model_validate({**data, "stages": []})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source=source, model=PipelineConfig)) from None
        cfg = cfg.model_copy(update={"stages": stages})
    if base_dir is not None:

        def _abs(p: str | None) -> str | None:
            if p is None:
                return None
            q = Path(os.path.expanduser(p))
            return str(q if q.is_absolute() else (base_dir / q).resolve())

        from targets import is_profile_path

        cfg = cfg.model_copy(
            update={
                "model": cfg.model.model_copy(update={"path": _abs(cfg.model.path)}),
                "calibration": cfg.calibration.model_copy(update={"file": _abs(cfg.calibration.file)}),
                "targets": [_abs(t) if is_profile_path(t) else t for t in cfg.targets],
                "stages": [_abs_paths(s, _abs) for s in cfg.stages],
            }
        )
    _check_targets(cfg, source)
    return cfg


def _abs_paths(stage: StageConfig, absolute: Any) -> StageConfig:
    """``stage`` with its ``path_fields`` that hold a string made absolute (a mapping, e.g. inline memory, stays)."""
    update = {f: absolute(getattr(stage, f)) for f in stage.path_fields if isinstance(getattr(stage, f), str)}
    return stage.model_copy(update=update) if update else stage


def _check_targets(cfg: PipelineConfig, source: str) -> None:
    from targets import load_target

    for i, name in enumerate(cfg.targets):
        try:
            load_target(name)
        except TargetError as exc:
            raise TargetError(f"{source}: targets[{i}]: {exc}") from None


def load_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base_dir=path.resolve().parent)


def default_config() -> PipelineConfig:
    """The embedded default: packaged all-MiniLM-L6-v2 -> ONNX -> per-target precision -> validate -> benchmark."""
    from importlib import resources

    text = (resources.files("pipeline") / "data" / "default.yaml").read_text(encoding="utf-8")
    import yaml

    return parse_config(yaml.safe_load(text), source="<embedded default>")


def coerce_config(
    config: PipelineConfig | Mapping[str, Any] | str | Path | None, *, stages: Sequence[Any] | None = None
) -> PipelineConfig:
    """Python API entry: a PipelineConfig, a dict shaped like the YAML, a YAML path, or None (the default).

    ``stages`` replaces the config's stages and takes the YAML forms too (``"export"``, ``{"export": {}}``) or
    typed :class:`StageConfig` objects; anything else raises :class:`ConfigError`."""
    if config is None:
        cfg = default_config()
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
    else:
        cfg = parse_config(config, source="<python config>", base_dir=Path.cwd())
    if stages is not None:
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
            raise ConfigError(f"<python stages>: stages: expected a list of stages, got {type(stages).__name__}")
        cfg = cfg.model_copy(update={"stages": _parse_stages(list(stages), "<python stages>")})
    return cfg
