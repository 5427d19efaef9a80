"""Config parsing: unknown keys and wrong types rejected with the file and key path; YAML == Python API."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

import pipeline.stages  # noqa: F401  (register the built-in stages before parametrizing over them)
from pipeline.config import PipelineConfig, load_config, parse_config
from pipeline.errors import ConfigError, TargetError
from pipeline.stage import STAGES


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_misspelled_stage_key_names_file_and_key_path(tmp_path):
    p = _write(tmp_path, "targets: [host-cpu]\nstages:\n  - export: {}\n  - quantize: {precison: int8}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "stages[1].quantize.precison" in msg and "unknown key 'precison'" in msg


def test_misspelled_top_level_key(tmp_path):
    p = _write(tmp_path, "targts: [host-cpu]\nstages: [export]\n")
    with pytest.raises(ConfigError, match=r"targts: unknown key 'targts'"):
        load_config(p)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("stages: [{prune: {sparsity: 1.5}}]\n", "stages[0].prune.sparsity"),
        ("stages: [{benchmark: {runs: many}}]\n", "stages[0].benchmark.runs"),
        ("stages: [{frobnicate: {}}]\n", "unknown stage 'frobnicate'"),
        ("stages: [{export: {}, quantize: {}}]\n", "expected one mapping"),
        ("seed: [1]\nstages: [export]\n", "seed"),
        ("targets: [host-cpu, host-cpu]\nstages: [export]\n", "targets listed twice"),
        ("stages: [export\n", "malformed YAML at line"),
        ("- just\n- a list\n", "must be a mapping"),
        ("stages: [{quantize: {precision: int3}}]\n", "stages[0].quantize.precision"),
    ],
)
def test_bad_configs_give_one_clear_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_target_is_a_target_error(tmp_path):
    with pytest.raises(TargetError, match=r"targets\[1\]: unknown target 'raspberry-pi-9'"):
        load_config(_write(tmp_path, "targets: [host-cpu, raspberry-pi-9]\nstages: [export]\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/edgepipe.yaml")


def test_yaml_and_python_api_map_one_to_one(tmp_path):
    from pipeline.stages.export import ExportConfig
    from pipeline.stages.prune import PruneConfig
    from pipeline.stages.quantize import QuantizeConfig

    yaml_cfg = load_config(
        _write(
            tmp_path,
            "targets: [host-cpu]\nstages:\n  - prune: {method: magnitude, sparsity: 0.3}\n  - export: {opset: 18}\n  - quantize: {precision: int8}\n",
        )
    )
    py_cfg = parse_config(
        {
            "targets": ["host-cpu"],
            "stages": [
                PruneConfig(method="magnitude", sparsity=0.3),
                ExportConfig(opset=18),
                QuantizeConfig(precision="int8"),
            ],
        }
    )
    assert yaml_cfg.stages == py_cfg.stages
    # and back: the YAML form of a parsed config parses to the same config
    assert parse_config(py_cfg.to_data()) == py_cfg


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("model: {path: ../m}\ncalibration: {file: texts.txt}\nstages: [export]\n")
    cfg = load_config(p)
    assert cfg.model.path == str((tmp_path / "m").resolve())
    assert cfg.calibration.file == str((tmp_path / "sub" / "texts.txt").resolve())


def test_configs_are_frozen():
    cfg = parse_config({"stages": ["export"]})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.stages[0].opset = 3  # type: ignore[misc]


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_registered_stage_round_trips(kind):
    cls = STAGES[kind].config_cls
    cfg = cls()  # every stage has usable defaults
    assert cls.model_validate(cfg.model_dump(mode="json")) == cfg
    assert cls.kind == kind


def test_registry_has_the_pipeline_stages():

    assert {"prune", "export", "quantize", "validate", "benchmark", "recover"} <= set(STAGES)


def test_embedded_default_config():
    from pipeline.config import DEFAULT_TARGETS, default_config

    cfg = default_config()
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.path is None and tuple(cfg.targets) == DEFAULT_TARGETS
    assert [s.kind for s in cfg.stages] == ["export", "quantize", "validate", "benchmark"]


def test_nested_unknown_key_suggests_the_closest_allowed_one():
    from pydantic import ValidationError

    from pipeline.config import PipelineConfig
    from pipeline.schema import format_validation_error

    with pytest.raises(ValidationError) as e:
        PipelineConfig.model_validate({"calibration": {"max_lenght": 64}})
    msg = format_validation_error(e.value, source="c.yaml", model=PipelineConfig)
    assert msg == "c.yaml: calibration.max_lenght: unknown key 'max_lenght' (did you mean 'max_length'?)"
    assert "did you mean" not in format_validation_error(e.value, source="c.yaml")  # no model: no guess
