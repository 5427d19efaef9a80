"""Target profiles: built-ins load and validate; users add their own by YAML; errors name the file."""

from __future__ import annotations

import pytest
import yaml

from pipeline.errors import TargetError
from targets import builtin_target_names, load_target

BUILTIN = [
    "host-cpu",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "android-arm64",
    "ios-arm64",
    "android-npu",
]


def test_builtin_names():
    assert sorted(builtin_target_names()) == sorted(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_profiles_are_complete(name):
    p = load_target(name)
    assert p.name == name
    assert p.providers[-1] == "CPUExecutionProvider"
    for prec in p.precisions:
        assert p.tolerances[prec].atol > 0
    assert p.cache_bytes() > 0  # the attention planner needs a fast-memory size


def test_capabilities_differ_as_data():
    # mobile profiles ask for ORT format; GPU profiles default to fp16; Pi defaults to int8
    assert load_target("android-arm64").ort_format and load_target("ios-arm64").mobile_check
    assert load_target("jetson-orin-nano").default_precision == "fp16"
    assert "n:m" in load_target("jetson-orin-nano").fast_patterns
    assert load_target("raspberry-pi-5").default_precision == "int8"
    assert not load_target("host-cpu").ort_format


def _user_profile(tmp_path, **changes):
    data = load_target("raspberry-pi-5").model_dump(mode="json")
    data.update(name="my-board", **changes)
    p = tmp_path / "my-board.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_user_profile_by_path(tmp_path):
    p = load_target(str(_user_profile(tmp_path, threads=3)))
    assert p.name == "my-board" and p.threads == 3


def test_user_profile_errors_name_file_and_key(tmp_path):
    path = _user_profile(tmp_path, thread=3)
    with pytest.raises(TargetError) as e:
        load_target(str(path))
    assert str(path) in str(e.value) and "unknown key 'thread'" in str(e.value)


def test_precision_without_tolerance_is_rejected(tmp_path):
    path = _user_profile(tmp_path, precisions=["fp16"], tolerances={"int8": {"atol": 1.0}})
    with pytest.raises(TargetError, match="tolerances missing"):
        load_target(str(path))


def test_unknown_target():
    with pytest.raises(TargetError, match="unknown target 'pi-zero'"):
        load_target("pi-zero")
    with pytest.raises(TargetError, match="not found"):
        load_target("/no/such/profile.yaml")
