"""Memory budget: the graph estimate against hand-counted bytes, the fresh-process measurement, the failure line."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtimes.memory import (
    MIB,
    budget_failure,
    estimate_memory,
    feed_shapes,
    max_context,
    measure_memory,
    memory_feeds,
    memory_shape,
    memory_summary,
    without_superseded_estimates,
)


def _chain(path: Path, d_in: int, d_mid: int, d_out: int, seed: int = 0) -> Path:
    """x (B, S, d_in) -> MatMul W1 -> Relu -> MatMul W2 -> y (B, S, d_out), fp32, opset 17."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((d_in, d_mid)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((d_mid, d_out)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_out])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_estimate_counts_weights_live_intermediates_and_io_exactly(tmp_path):
    b, s, d_in, d_mid, d_out = 3, 5, 7, 13, 3  # odd sizes: no padding coincidences
    path = _chain(tmp_path / "m.onnx", d_in, d_mid, d_out)
    est = estimate_memory(path, {"x": (b, s)}, arena_factor=1.0, overhead_mb=0.0)
    weights = 4 * (d_in * d_mid + d_mid * d_out)
    live = 4 * b * s * d_mid * 2  # at Relu: h (its input, last use) and r are both live
    io = 4 * b * s * (d_in + d_out)
    n16 = -(-d_mid // 16) * 16, -(-d_out // 16) * 16  # MLAS pads N to 16 columns when it pre-packs B
    prepack = 4 * (d_in * (n16[0] - d_mid) + d_mid * (n16[1] - d_out))
    assert est["weights_mb"] == pytest.approx(weights / MIB, abs=0.01)
    assert est["live_peak_mb"] == pytest.approx(live / MIB, abs=0.01)
    assert est["io_mb"] == pytest.approx(io / MIB, abs=0.01)
    assert est["prepack_mb"] == pytest.approx(prepack / MIB, abs=0.01)
    assert est["total_mb"] == pytest.approx((weights + live + io + prepack) / MIB, abs=0.02)
    assert est["unknown_shapes"] == 0 and (est["batch"], est["seq"]) == (b, s)
    # the arena factor and overhead scale and add as documented
    est4 = estimate_memory(path, {"x": (b, s)}, arena_factor=4.0, overhead_mb=10.0)
    assert est4["activations_mb"] == pytest.approx(4 * live / MIB, abs=0.01)
    assert est4["total_mb"] == pytest.approx(est["total_mb"] + 3 * live / MIB + 10, abs=0.02)


def test_decoder_shapes_and_feeds_fill_the_kv_cache_to_the_context():
    io = {
        "input_names": ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"],
        "with_past": True,
        "num_kv_heads": 3,
        "head_dim": 5,
    }
    shapes = feed_shapes(io, 2, 7, context=20)
    assert shapes == {
        "input_ids": (2, 7),
        "attention_mask": (2, 20),
        "past_key_values.0.key": (2, 3, 13, 5),
        "past_key_values.0.value": (2, 3, 13, 5),
    }
    feeds = {
        "input_ids": np.ones((2, 7), np.int64),
        "attention_mask": np.ones((2, 7), np.int64),
        "past_key_values.0.key": np.zeros((2, 3, 0, 5), np.float32),
        "past_key_values.0.value": np.zeros((2, 3, 0, 5), np.float32),
    }
    got = memory_feeds(feeds, io, 20)
    assert {k: v.shape for k, v in got.items()} == shapes
    assert got["past_key_values.0.key"].dtype == np.float32
    # an encoder (no cache) is fed as it is
    assert memory_feeds(feeds, {**io, "with_past": False}, 20)["attention_mask"].shape == (2, 7)


def test_memory_shape_and_context_take_the_largest_configured_and_cap_at_the_model():
    class Cal:
        batch_size, max_length = 8, 128

    class Static:
        batch, seq = 1, 256

    class Prof:
        static_shapes = Static()
        max_context = 4096

    class Dynamic:
        static_shapes = None

    assert memory_shape(Cal(), Dynamic(), limit=None) == (8, 128)
    assert memory_shape(Cal(), Dynamic(), limit=100) == (8, 100)
    # a fixed-shape model takes exactly its shape (export refuses a static seq beyond the model's limit)
    assert memory_shape(Cal(), Prof(), limit=None) == (1, 256)
    assert max_context(Prof(), limit=1024) == 1024
    assert max_context(type("P", (), {"max_context": None})(), limit=1024) == 1024
    assert max_context(type("P", (), {"max_context": 300})(), limit=1024) == 300


def test_measured_memory_counts_the_model_not_the_interpreter(tmp_path):
    """A 16 MiB weight: the fresh-process figure sees it (and little else), not the ~50 MiB interpreter."""
    d = 1024
    path = _chain(tmp_path / "big.onnx", d, 4096, 1)  # w1: 1024 x 4096 fp32 = 16 MiB
    feeds = {"x": np.ones((2, 3, d), np.float32)}
    got = measure_memory(path, feeds, threads=1, python=sys.executable)
    est = estimate_memory(path, {"x": (2, 3)})
    assert got["hwm_reset"] is True and got["baseline_mb"] > 10
    # below the load's high-water mark (~42 MiB here: the parsed protobuf beside the tensors) -- the reset works
    assert 16 <= got["model_mb"] < 16 + 20 and got["load_peak_mb"] > got["model_mb"], got
    assert est["weights_mb"] == pytest.approx(16.02, abs=0.05)
    assert abs(got["model_mb"] - est["total_mb"]) < 8, (got, est)  # weights + ~10 MiB session overhead


def test_measure_memory_reports_a_broken_model_in_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="memory probe failed"):
        measure_memory(bad, {"x": np.ones((1, 1), np.float32)}, threads=1)


def test_budget_failure_line_and_summary():
    est = {
        "total_mb": 116.1,
        "weights_mb": 86.08,
        "activations_mb": 19.6,
        "overhead_mb": 10.0,
        "io_mb": 0.4,
        "kv_cache_mb": 0.0,
        "batch": 8,
        "seq": 32,
    }
    row = budget_failure("tight", 75, est, measured=False)
    assert row["check"] == "memory_budget" and row["limit"] == "memory_budget_mb 75"
    assert "estimated 116.1 MiB at 8x32" in row["value"] and "over by 41.1 MiB" in row["value"]
    assert "\n" not in row["value"]
    meas = {"model_mb": 48.2, "batch": 8, "seq": 32, "threads": 1, "load_peak_mb": 43.0}
    assert budget_failure("tight", 75, meas, measured=True) is None
    assert "measured 48.2 MiB" in budget_failure("tight", 40, meas, measured=True)["value"]
    s = memory_summary(75, est, meas)
    assert s == {
        "budget_mb": 75,
        "estimate_mb": 116.1,
        "measured_mb": 48.2,
        "figure_mb": 48.2,
        "basis": "measured",
        "headroom_mb": 26.8,
        "ok": True,
    }
    assert memory_summary(75, est, None)["ok"] is False and memory_summary(75, None, None) is None


def test_a_measurement_within_budget_supersedes_an_estimate_over_it():
    est_row = {"target": "a", "check": "memory_budget", "value": "estimated 51.7 MiB at 8x32 ...", "limit": "x"}
    meas_row = {"target": "b", "check": "memory_budget", "value": "measured 80.0 MiB at 8x32 ...", "limit": "x"}
    other = {"target": "a", "check": "cos_mean", "value": 0.5, "limit": 0.9}
    memory = {
        "a": memory_summary(50, {"total_mb": 51.7}, {"model_mb": 48.2}),  # measured within: the estimate goes
        "b": memory_summary(75, {"total_mb": 79.0}, {"model_mb": 80.0}),
    }
    assert without_superseded_estimates([est_row, meas_row, other], memory) == [meas_row, other]
    # no measurement (no benchmark stage): the estimate stands
    memory["a"] = memory_summary(50, {"total_mb": 51.7}, None)
    assert without_superseded_estimates([est_row], memory) == [est_row]
