"""Silent-fallback guard: static coverage from documented op lists, measured placement on CPU, the failure line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtimes.placement import CPU, coverage_failure, node_flops, provider_coverage
from targets import load_target
from targets.providers import documented_providers, provider_ops

B, S, D, N = 3, 5, 7, 11  # odd sizes


def _graph(path: Path) -> Path:
    """x (B, S, D) -> MatMul W (D, N) [3-D: beyond XNNPACK's 2-D MatMul] -> Erf [in no documented list here]
    -> Softmax [documented by XNNPACK and QNN] -> y."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((D, N)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Erf", ["h"], ["e"], name="erf"),
        helper.make_node("Softmax", ["e"], ["y"], name="sm", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", N])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    return _graph(tmp_path / "g.onnx")


FEEDS = {"x": np.ones((B, S, D), np.float32)}
MM_FLOPS = 2 * B * S * D * N


def test_static_coverage_against_the_documented_list(model):
    cov, rows = provider_coverage(model, FEEDS, ["XnnpackExecutionProvider", CPU])
    assert cov["method"] == "static" and cov["source"].startswith("https://onnxruntime.ai/")
    assert cov["nodes"] == 3 and cov["nodes_on_provider"] == 1 and cov["node_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert cov["unsupported"] == {"MatMul": 1, "Erf": 1}
    assert cov["flops"] == MM_FLOPS and cov["flop_share"] == 0.0  # the only counted FLOPs fell back to CPU
    why = {r["name"]: r.get("why") for r in rows}
    assert "input rank 3 > 2" in why["mm"] and "not in the documented list" in why["erf"] and why["sm"] is None
    # QNN documents MatMul at any rank, so only Erf falls back; all the FLOPs stay on it
    cov, _ = provider_coverage(model, FEEDS, ["QNNExecutionProvider", CPU])
    assert cov["unsupported"] == {"Erf": 1} and cov["flop_share"] == 1.0


def test_measured_placement_on_cpu(model):
    cov, rows = provider_coverage(model, FEEDS, [CPU])
    assert cov["method"] == "measured" and cov["provider"] == CPU
    assert cov["node_share"] == 1.0 and cov["unsupported"] == {}
    assert {r["name"] for r in rows} == {"mm", "erf", "sm"} and all(r["provider"] == CPU for r in rows)
    assert cov["flops"] == MM_FLOPS  # shapes from ORT's profile, not guessed


def test_min_provider_coverage_failure_line(model):
    prof = load_target("raspberry-pi-5").model_copy(update={"min_provider_coverage": 0.5})
    cov, _ = provider_coverage(model, FEEDS, prof.providers)
    row = coverage_failure("raspberry-pi-5", prof, cov)
    assert row == {
        "target": "raspberry-pi-5",
        "check": "provider_coverage",
        "value": "node share 0.333 on XnnpackExecutionProvider (static); unsupported: MatMul×1, Erf×1",
        "limit": "min_provider_coverage 0.5",
    }
    assert coverage_failure("x", prof.model_copy(update={"min_provider_coverage": 0.3}), cov) is None
    assert coverage_failure("x", prof.model_copy(update={"min_provider_coverage": None}), cov) is None
    by_flops = prof.model_copy(update={"min_provider_coverage": 0.01, "provider_coverage_by": "flops"})
    assert "FLOP share 0.000" in coverage_failure("x", by_flops, cov)["value"]


def test_a_provider_without_a_list_is_unknown_and_fails_a_required_share(model):
    cov, _ = provider_coverage(model, FEEDS, ["NnapiExecutionProvider", CPU])
    assert cov["method"] == "unknown" and cov["node_share"] is None and cov["unsupported"] == {}
    prof = load_target("android-arm64").model_copy(update={"min_provider_coverage": 0.5})
    assert "unknown" in coverage_failure("a", prof, cov)["value"]


def test_node_flops_matches_a_float64_count():
    # Gemm with transA: A is (K, M)
    m, k, n = 3, 5, 7
    assert node_flops("Gemm", [[k, m], [k, n]], [[m, n]]) == 2 * m * k * n
    assert node_flops("Gemm", [[m, k], [k, n]], [[m, n]]) == 2 * m * k * n
    # Conv (N, C, H, W) with W (Cout, Cin/g, kh, kw)
    x = np.zeros((1, 3, 9, 9))
    w = np.zeros((4, 3, 3, 3))
    out = (1, 4, 7, 7)
    macs = float(np.prod(out, dtype=np.float64) * np.prod(w.shape[1:], dtype=np.float64))
    assert node_flops("Conv", [list(x.shape), list(w.shape)], [list(out)]) == 2 * macs
    # attention over (B, H, S, D) with S_kv keys: QK^T and PV
    assert node_flops("Attention", [[2, 3, 5, 4], [2, 3, 9, 4], [2, 3, 9, 4]], [[2, 3, 5, 4]]) == 4 * 2 * 3 * 5 * 4 * 9
    assert node_flops("Relu", [[2, 3]], [[2, 3]]) == 0


def test_shipped_provider_lists_load_and_profile_fields_validate():
    assert {"XnnpackExecutionProvider", "QNNExecutionProvider", "TensorrtExecutionProvider"} <= set(
        documented_providers()
    )
    for name in documented_providers():
        ops = provider_ops(name)
        assert ops.provider == name and ops.source.startswith("https://")
    assert provider_ops("NoSuchExecutionProvider") is None
    from pydantic import ValidationError

    from targets.profile import TargetProfile

    data = load_target("host-cpu").model_dump()
    with pytest.raises(ValidationError):
        TargetProfile.model_validate({**data, "min_provider_coverage": 1.5})
    with pytest.raises(ValidationError):
        TargetProfile.model_validate({**data, "max_context": 0})
