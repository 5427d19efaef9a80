"""Tests for exporters.mobile: .ort conversion parity and the usability summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporters.mobile import _parse_usability, mobile_usability, to_ort_format
from runtimes.session import feeds_for, make_session
from tests.runtimes.test_session import sample_encodings, tiny_encoder


def test_ort_format_matches_onnx_exactly(tmp_path: Path) -> None:
    src = tiny_encoder(tmp_path / "enc.onnx")
    res = to_ort_format(src, tmp_path / "mobile")
    assert res.ort_path == tmp_path / "mobile" / "enc.ort" and res.ort_path.stat().st_size == res.size_bytes > 0
    assert res.config_path.name == "enc.required_operators.config"
    all_ops = {op for key, ops in res.operators.items() if key.startswith("ai.onnx;") for op in ops}
    assert all_ops == {"Cast", "Gather", "MatMul", "Tanh", "Unsqueeze", "Mul"}
    assert ".ort." not in res.config_path.read_text()  # no temp path left in the header
    assert sorted(p.name for p in (tmp_path / "mobile").iterdir()) == ["enc.ort", "enc.required_operators.config"]
    onnx_sess = make_session(src, threads=1)
    ort_sess = make_session(res.ort_path, threads=1)
    feeds = feeds_for(onnx_sess, sample_encodings())
    np.testing.assert_array_equal(ort_sess.run(None, feeds)[0], onnx_sess.run(None, feeds)[0])


def test_ort_format_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        to_ort_format(tmp_path / "missing.onnx", tmp_path)
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match=r"m.txt"):
        to_ort_format(tmp_path / "m.txt", tmp_path)
    src = tiny_encoder(tmp_path / "enc.onnx")
    with pytest.raises(ValueError, match="'riscv'"):
        to_ort_format(src, tmp_path, target_platform="riscv")


def test_mobile_usability_summary(tmp_path: Path) -> None:
    rep = mobile_usability(tiny_encoder(tmp_path / "enc.onnx"))
    assert rep["error"] is None and rep["raw"]
    assert isinstance(rep["try_nnapi_or_coreml"], bool) and rep["recommendation"]
    nnapi = rep["eps"]["NNAPI"]
    # dynamic shapes: nothing runs as-is; fixed shapes: all 6 nodes in one partition
    assert nnapi["as_is"]["nodes_supported"] == 0 and nnapi["as_is"]["nodes_total"] == 6
    assert nnapi["fixed_shapes"] == {"partitions": 1, "nodes_supported": 6, "nodes_total": 6, "coverage": 1.0}
    assert nnapi["verdict_fixed_shapes"] == "YES"
    assert any(k.startswith("CoreML") for k in rep["eps"])


def test_mobile_usability_never_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    rep = mobile_usability(bad)
    assert rep["error"] and rep["recommendation"] is None
    assert _parse_usability(["garbage", "Checking NNAPI", "7 partitions with a total of x/y nodes"]) == {
        "NNAPI": {"unsupported_ops": []}
    }
