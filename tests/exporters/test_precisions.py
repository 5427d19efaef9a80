"""The precision registry: names said once, read by the converter, the quantize stage config and the profile
schema; a new precision is one file plus one registration (shown with a toy one); targets/ stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

import pipeline
from exporters.precision_registry import (
    PRECISIONS,
    ConversionJob,
    precision_names,
    precision_subset,
    register_precision,
)
from exporters.quantize import convert_precision
from pipeline.errors import ConfigError, TargetError
from pipeline.stages.quantize import QuantizeConfig
from targets import load_target
from targets.profile import TargetProfile

TOY = "toy-copy"


def _toy_convert(job: ConversionJob) -> tuple[int, list[str], list[str]]:
    """The toy precision's whole implementation (the 'one file'): copy the model unchanged."""
    shutil.copyfile(job.src, job.tmp)
    return 0, [], ["toy: copied"]


@pytest.fixture
def toy():
    assert TOY not in PRECISIONS
    # the 'one registration'; a module path keeps the registry a leaf, exactly as the built-ins are registered
    register_precision(TOY, description="copy (test)", converter=f"{__name__}:_toy_convert")
    try:
        yield TOY
    finally:
        PRECISIONS.pop(TOY, None)


def _profile_data(**changes) -> dict:
    data = load_target("host-cpu").model_dump(mode="json")
    data.update(name="toy-board", cache={"l1_kb": 32, "l2_kb": 512, "l3_kb": 8192}, **changes)
    return data


def test_builtins_registered_once() -> None:
    assert precision_names()[:5] == ["fp32", "fp16", "int8", "int8-static", "int4"]
    assert all(PRECISIONS[n].description for n in precision_names())
    with pytest.raises(ValueError, match="registered twice"):
        register_precision("int8", description="other", converter="somewhere.else:convert")
    with pytest.raises(ValueError, match="registered precisions: fp32, fp16"):
        precision_subset(["fp32", "int7"])


def test_unknown_precision_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown precision 'toy-copy'; registered precisions: fp32"):
        QuantizeConfig(precision=TOY)
    with pytest.raises(ValueError, match="unknown precision"):
        TargetProfile.model_validate(_profile_data(precisions=[TOY], tolerances={TOY: {"atol": 1.0}}))


def test_toy_precision_is_accepted_everywhere(toy, tmp_path: Path, tiny_models) -> None:
    # config validation reads the registry: the stage config and a profile accept the new name
    assert QuantizeConfig(precision=toy).precision == toy
    assert QuantizeConfig(per_target={"toy-board": toy}).per_target == {"toy-board": toy}
    prof_path = tmp_path / "toy-board.yaml"
    prof_path.write_text(
        yaml.safe_dump(
            _profile_data(precisions=[toy, "fp32"], tolerances={toy: {"atol": 1e-4}, "fp32": {"atol": 1e-4}})
        )
    )
    assert load_target(str(prof_path)).default_precision == toy
    # a whole run config with that profile passes preflight (the quantize stage checks target support)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models['bert']}}}\ntargets: [{prof_path}]\n"
        f"stages: [export, {{quantize: {{precision: {toy}}}}}, validate]\n"
    )
    assert pipeline.validate_config(cfg).stages[1].precision == toy
    # ... and convert_precision runs its converter
    src = tmp_path / "m.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])), src)
    out = convert_precision(src, tmp_path / "o.onnx", toy)
    assert out.notes[0] == "toy: copied" and (tmp_path / "o.onnx").read_bytes() == src.read_bytes()


def test_bad_precision_in_yaml_is_one_line(tmp_path: Path) -> None:
    prof = tmp_path / "b.yaml"
    prof.write_text(yaml.safe_dump(_profile_data(precisions=["int3"], tolerances={"int3": {"atol": 1.0}})))
    with pytest.raises(TargetError) as e:
        load_target(str(prof))
    msg = str(e.value)
    assert "\n" not in msg and str(prof) in msg and "precisions" in msg and "registered precisions: fp32" in msg
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: [host-cpu]\nstages: [export, {quantize: {per_target: {host-cpu: int3}}}]\n")
    with pytest.raises(ConfigError, match=r"stages\[1\]\.quantize\.per_target.*unknown precision 'int3'"):
        pipeline.validate_config(cfg)


def test_targets_do_not_load_the_converters() -> None:
    # profiles validate precision names without importing onnx / onnxruntime / the converter modules
    code = (
        "import sys, targets; targets.load_target('raspberry-pi-5');"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'torch')"
        " or m.startswith('exporters.precisions') or m == 'exporters.quantize'];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
