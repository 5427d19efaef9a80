"""A new exporter is one file plus one registration: the toy exporter of ``toy_exporter.py`` is accepted by the
``export`` stage's config and run by ``export_onnx``, with no other change."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.onnx import dummy_feeds, export_onnx, torch_reference
from exporters.registry import EXPORTERS, cross_check_exporter, exporter_names, register_exporter
from pipeline.errors import ConfigError
from pipeline.models import load_model
from runtimes.session import make_session
from tests.helpers import make_tiny_model

TOY = "tests.exporters.toy_exporter"


@pytest.fixture
def toy():
    mod = importlib.import_module(TOY)
    mod.CALLS.clear()
    yield mod
    EXPORTERS.pop("toy_opset17")
    sys.modules.pop(TOY)


def test_builtin_exporters_are_registered_in_order() -> None:
    assert exporter_names()[:2] == ["dynamo", "optimum"]
    assert cross_check_exporter("dynamo") == "optimum" and cross_check_exporter("optimum") == "dynamo"


def test_toy_exporter_through_stage_config_and_export_onnx(toy, tmp_path: Path) -> None:
    from pipeline.config import parse_config

    cfg = parse_config({"targets": ["host-cpu"], "stages": [{"export": {"exporter": "toy_opset17"}}]})
    assert cfg.stages[0].exporter == "toy_opset17"

    loaded = load_model(make_tiny_model(tmp_path / "models", "bert", initializer_range=0.2))
    res = export_onnx(loaded, tmp_path / "onnx", opset=18, exporter="toy_opset17")
    assert toy.CALLS == [(loaded.model_type, 18, False)]
    assert res.exporter == "toy_opset17" and res.opset == 17  # read back from the file the toy wrote
    feeds = dummy_feeds(res, batch=2, seq=7)
    got = make_session(res.path).run(list(res.output_names), feeds)[0]
    np.testing.assert_allclose(got, torch_reference(loaded, feeds)[res.output_names[0]], atol=1e-4, rtol=0)
    assert cross_check_exporter("toy_opset17") == "dynamo"


def test_unknown_exporters_are_refused_with_the_registered_names() -> None:
    from pipeline.config import parse_config

    with pytest.raises(ConfigError, match=r"stages\[0\]\.export\.exporter: .*'dynamo', 'optimum'.*got 'tflite'"):
        parse_config({"targets": ["host-cpu"], "stages": [{"export": {"exporter": "tflite"}}]})
    with pytest.raises(ValueError, match="registered twice"):
        register_exporter("dynamo", description="again")(lambda *a: None)
