"""Static shapes (issue 16 item 2): fixed-shape models, padded feeds and bundles, the android-npu profile end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from exporters.static_shapes import StaticShapeError, dynamic_dims, fit_feeds, make_static
from runtimes.session import make_session


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Dynamic-shape exports of the tiny BERT and the tiny GPT-2 without a KV cache."""
    from exporters.onnx import export_onnx
    from pipeline.models import load_model

    root = tmp_path_factory.mktemp("static-exports")
    bert = load_model(tiny_models["bert"], "feature-extraction")
    gpt2 = load_model(tiny_models["gpt2"], "text-generation")
    return {
        "bert": export_onnx(bert, root / "bert", opset=18, with_past=False).path,
        "gpt2": export_onnx(gpt2, root / "gpt2", opset=18, with_past=False).path,
    }


def _feeds(model: Path, b: int, s: int, seed: int = 0) -> dict[str, np.ndarray]:
    """(b, s) token feeds with ragged right padding: row i has s - i valid tokens (at least 1)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, s), dtype=np.int64)
    for i in range(b):
        mask[i, : max(1, s - i)] = 1
    names = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
    out = {"input_ids": rng.integers(5, 30, (b, s)) * mask, "attention_mask": mask}
    if "token_type_ids" in names:
        out["token_type_ids"] = np.zeros((b, s), dtype=np.int64)
    if "position_ids" in names:
        out["position_ids"] = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    return out


def _run(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = make_session(model, threads=1)
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_make_static_leaves_no_dynamic_dim_and_keeps_the_outputs(exports, tmp_path, family) -> None:
    src = exports[family]
    before = dynamic_dims(onnx.load(str(src)))
    assert any(d.startswith("input 'input_ids'") for d in before)  # the walker sees the exporter's symbolic dims
    batch, seq = 3, 7  # odd sizes
    dst = make_static(src, tmp_path / "static.onnx", batch=batch, seq=seq)
    model = onnx.load(str(dst))
    assert dynamic_dims(model) == []
    g = model.graph
    assert len(g.value_info) > 20  # shape inference recorded the intermediate values (and they are all fixed)
    for vi in [*g.input, *g.output, *g.value_info]:
        dims = vi.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), vi.name
    assert [d.dim_value for d in g.input[0].type.tensor_type.shape.dim] == [batch, seq]
    # the same inputs give the same outputs as the dynamic model, on valid positions
    (chunk, valid), *_ = fit_feeds(_feeds(src, 2, 5), batch, seq)
    want = _run(src, _feeds(src, 2, 5))  # (2, 5, D)
    got = _run(dst, chunk)  # (3, 7, D)
    assert got.shape[:2] == (batch, seq)
    m = valid[:2, :5].astype(bool)
    np.testing.assert_allclose(got[:2, :5][m], want[m], atol=1e-5)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        _run(dst, _feeds(src, 2, 5))  # a fixed-shape model refuses other shapes


def test_kv_cache_decoder_is_refused_with_the_reason(tmp_path) -> None:
    f = onnx.TensorProto.FLOAT
    ids = onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "seq"])
    past = onnx.helper.make_tensor_value_info("past_key_values.0.key", f, ["batch", 2, "past", 4])
    out = onnx.helper.make_tensor_value_info("present.0.key", f, ["batch", 2, "past", 4])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])], "g", [ids, past], [out]
    )
    onnx.save(onnx.helper.make_model(graph), tmp_path / "kv.onnx")
    with pytest.raises(StaticShapeError, match=r"past_key_values.*prefill and decode graphs.*with_past: false"):
        make_static(tmp_path / "kv.onnx", tmp_path / "s.onnx", batch=1, seq=8)
    assert not (tmp_path / "s.onnx").exists()


def test_make_static_in_place_keeps_a_fixed_model_fixed(exports, tmp_path) -> None:
    dst = make_static(exports["bert"], tmp_path / "m.onnx", batch=2, seq=9)
    make_static(dst, dst, batch=2, seq=9)  # quantize re-runs it on its output
    assert dynamic_dims(onnx.load(str(dst))) == []


def test_dynamic_dims_reports_nodes_without_shapes() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, "n"])
    nodes = [onnx.helper.make_node("Relu", ["x"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]))
    assert dynamic_dims(model) == ["output 'y'[1]=n", "node output 'h': no shape"]


def test_fit_feeds_pads_truncates_and_marks_filler_rows() -> None:
    ids = np.arange(1, 5 * 9 + 1, dtype=np.int64).reshape(5, 9)
    mask = np.ones((5, 9), dtype=np.int64)
    mask[1, 4:] = 0  # row 1: 4 real tokens
    chunks = fit_feeds({"input_ids": ids, "attention_mask": mask}, 3, 6)  # 5 rows -> 2 chunks of 3; 9 -> 6 tokens
    assert len(chunks) == 2
    (c0, v0), (c1, v1) = chunks
    assert c0["input_ids"].shape == (3, 6) and c1["input_ids"].shape == (3, 6)
    np.testing.assert_array_equal(c0["input_ids"], ids[:3, :6])  # truncated
    np.testing.assert_array_equal(v0[1], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(c1["input_ids"][:2], ids[3:5, :6])
    np.testing.assert_array_equal(c1["input_ids"][2], ids[4, :6])  # filler row: a copy of the last real row ...
    assert c1["attention_mask"][2].sum() == 6 and v1[2].sum() == 0  # ... attended, never compared
    (p, v), *_ = fit_feeds({"input_ids": ids[:1, :2], "attention_mask": mask[:1, :2]}, 1, 4)
    np.testing.assert_array_equal(p["input_ids"], [[1, 2, 0, 0]])  # right padding with zeros ...
    np.testing.assert_array_equal(p["attention_mask"], [[1, 1, 0, 0]])  # ... masked out
    np.testing.assert_array_equal(v, [[1, 1, 0, 0]])
    with pytest.raises(StaticShapeError, match="past"):
        fit_feeds({"input_ids": ids, "past": np.zeros((5, 2, 0, 4))}, 1, 4)


def test_static_bundle_pads_inputs_and_reference_and_passes(exports, tmp_path) -> None:
    from tests.runtimes.bundles import write_test_bundle

    src = exports["bert"]
    static = make_static(src, tmp_path / "m.onnx", batch=4, seq=11)
    feeds = _feeds(src, 3, 8)
    ref = _run(src, feeds)  # (3, 8, D): the reference at the caller's shape
    out = write_test_bundle(
        tmp_path / "bundle",
        static,
        feeds,
        ref,
        providers=["QNNExecutionProvider", "CPUExecutionProvider"],
        runs=1,
        warmup=0,
        static_shape=(4, 11),
    )
    cfg = json.loads((out / "bundle.json").read_text())
    assert cfg["static_shape"] == [4, 11] and cfg["mask_input"] == "valid_mask"
    with np.load(out / "inputs.npz") as z:
        assert {k: z[k].shape for k in z.files} == {k: (4, 11) for k in [*feeds, "valid_mask"]}
        assert z["valid_mask"][3].sum() == 0 and z["valid_mask"][:3].sum() == feeds["attention_mask"].sum()
    with np.load(out / "reference.npz") as z:
        assert z["last_hidden_state"].shape == (4, 11, ref.shape[-1])
    proc = subprocess.run([sys.executable, "evaluate.py"], cwd=out, capture_output=True, text=True, check=False)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and res["ok"] and res["max_abs_diff"] < 1e-4, proc.stderr[-500:]
    with pytest.raises(ValueError, match="12 positions but the model's static sequence is 11"):
        write_test_bundle(
            tmp_path / "b2",
            static,
            _feeds(src, 1, 12),
            np.zeros((1, 12, 4), np.float32),
            atol=1.0,
            min_cosine=None,
            providers=[],
            static_shape=(4, 11),
        )


@pytest.mark.slow
def test_android_npu_profile_end_to_end(tiny_models, tmp_path) -> None:
    """The NPU-style profile: fixed-shape int8 static QDQ model, padded bundle that passes, parity on padded inputs."""
    import pipeline
    from targets.profile import load_target

    prof = load_target("android-npu")
    assert prof.static_shapes is not None and "QNNExecutionProvider" == prof.providers[0]
    assert prof.default_precision == "int8-static" and prof.device == "npu"
    cfg = {
        "model": {"path": str(tiny_models["bert"])},
        "targets": ["android-npu"],
        "calibration": {"samples": 8, "heldout": 8, "max_length": 32},
        "stages": [{"export": {}}, {"quantize": {}}, {"validate": {}}, {"benchmark": {"runs": 2, "warmup": 1}}],
    }
    run_dir = tmp_path / "run"
    report = pipeline.run(cfg, workdir=run_dir, progress=False)
    t = report["targets"]["android-npu"]
    assert report["ok"] and t["precision"] == "int8-static" and t["parity"]["ok"]
    # the memory budget and the provider placement run the fixed-shape model at its own shape
    assert t["memory"]["basis"] == "measured" and t["provider_coverage"]["method"] in ("static", "unknown")
    model = onnx.load(str(run_dir / "android-npu" / "model.onnx"))
    assert dynamic_dims(model) == []
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)  # QDQ, what HTP takes
    b, s = prof.static_shapes.batch, prof.static_shapes.seq
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [b, s]
    bundle = run_dir / "android-npu" / "bundle"
    with np.load(bundle / "inputs.npz") as z:
        assert z["input_ids"].shape == (b, s) and 0 < z["valid_mask"].sum() < s  # padded from <= 32 tokens
    proc = subprocess.run([sys.executable, "evaluate.py", "--runs", "1"], cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr[-500:]
