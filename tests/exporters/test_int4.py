"""int4 weight-only (MatMulNBits): structure, options honoured, a float64 oracle on odd sizes, the quantize stage
with the validate gates on the tiny GPT, and one-line errors for bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

import pipeline
from exporters.precision_registry import Int4Options
from exporters.precisions.int4 import lm_head_node
from exporters.quantize import convert_precision
from pipeline.errors import ConfigError, TargetError
from targets import load_target

pytestmark = pytest.mark.slow

GATES = {"min_top1_agreement": 0.9, "max_ppl_ratio": 1.05}


@pytest.fixture(scope="module")
def int4_run(tiny_models, tmp_path_factory):
    """export -> quantize int4 -> validate (gated) on the tiny GPT: an x86 target, an ORT-format arm64 target and
    a user's profile with GPTQ."""
    tmp = tmp_path_factory.mktemp("int4")
    run_dir = tmp / "r"
    # a user's board that asks for GPTQ (calibrated on the stage's calibration text) at block 16
    board = load_target("host-cpu").model_dump(mode="json")
    board.update(name="gptq-board", cache={"l1_kb": 32, "l2_kb": 512}, int4={"block_size": 16, "algorithm": "gptq"})
    (tmp / "gptq-board.yaml").write_text(yaml.safe_dump(board))
    report = pipeline.run(
        {
            "model": {"path": str(tiny_models["gpt2"])},
            "targets": ["host-cpu", "android-arm64", str(tmp / "gptq-board.yaml")],
            "calibration": {"samples": 8, "heldout": 8, "max_length": 24},
            "stages": [{"export": {}}, {"quantize": {"precision": "int4"}}, {"validate": GATES}],
        },
        workdir=run_dir,
        progress=False,
    )
    return run_dir, report


@pytest.fixture(scope="module")
def gpt_onnx(int4_run) -> Path:
    """The fp32 tiny GPT as exported (Gemm linear layers, Gather embeddings, MatMul LM head, KV-cache I/O)."""
    return next((int4_run[0] / "stages").glob("*-export/**/model.onnx"))


def _feeds(path: Path, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(3, 70, (batch, seq)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, seq), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        else:  # past key / value: (B, heads, 0, head_dim) = empty cache
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def _logits(path: Path, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


def _float_weight_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """name -> op type of every MatMul / Gemm / Gather still reading a float constant (an unquantized weight)."""
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    return {
        n.name: n.op_type
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm", "Gather") and set(n.input[:2]) & floats
    }


def test_int4_stage_passes_the_gates(int4_run) -> None:
    run_dir, report = int4_run
    assert report["ok"] is True
    on_disk = json.loads((run_dir / "report.json").read_text())
    stages = {s["name"]: s for s in on_disk["stages"]}
    assert stages["validate"]["metrics"]["failures"] == []
    for name in ("host-cpu", "android-arm64", "gptq-board"):
        q = stages["quantize"]["metrics"]["targets"][name]
        prof = load_target(str(run_dir.parent / "gptq-board.yaml") if name == "gptq-board" else name).int4_settings
        assert q["precision"] == "int4" and q["int4"]["block_size"] == prof.block_size
        assert q["int4"]["algorithm"] == prof.algorithm and q["int4"]["lm_head"] == "int8"
        fid = stages["validate"]["metrics"]["targets"][name]["fidelity"]
        assert fid["top1_agreement"] >= GATES["min_top1_agreement"] and fid["ppl_ratio"] <= GATES["max_ppl_ratio"]
        model = onnx.load(str(run_dir / name / "model.onnx"))
        ops = {n.op_type for n in model.graph.node}
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and not _float_weight_nodes(model)
        assert all(
            a.i == prof.block_size
            for n in model.graph.node
            if n.op_type == "MatMulNBits"
            for a in n.attribute
            if a.name == "block_size"
        )
    assert (run_dir / "android-arm64" / "model.ort").is_file()  # ORT format (mobile) takes the contrib ops


@pytest.mark.parametrize(
    ("embeddings", "lm_head", "block_size"), [(True, "int4", 16), (False, "fp32", 32), (True, "int8", 32)]
)
def test_embeddings_and_lm_head_options(gpt_onnx: Path, tmp_path: Path, embeddings, lm_head, block_size) -> None:
    dst = tmp_path / "q.onnx"
    opts = Int4Options(block_size=block_size, embeddings=embeddings, lm_head=lm_head)
    rep = convert_precision(gpt_onnx, dst, "int4", int4=opts)
    model = onnx.load(str(dst))
    head = lm_head_node(onnx.load(str(gpt_onnx)))
    assert head is not None
    left = _float_weight_nodes(model)
    expect = {} if embeddings else {n: "Gather" for n, op in left.items() if op == "Gather"}
    if lm_head == "fp32":
        expect[head] = "MatMul"
    assert left == expect and (embeddings or len(expect) >= 2)  # wte + wpe stay fp32 when not quantized
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert all(a["block_size"] == block_size for a in nbits.values())
    assert all(a["accuracy_level"] == opts.accuracy_level for a in nbits.values())
    head_bits = [a["bits"] for name, a in nbits.items() if name.startswith(head)]
    assert head_bits == ({"int4": [4], "int8": [8], "fp32": []}[lm_head])
    assert rep.nodes_quantized == len(nbits) + sum(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    feeds = _feeds(gpt_onnx)
    ref, got = _logits(gpt_onnx, feeds), _logits(dst, feeds)
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.9
    assert 0 < np.abs(ref - got).max() < 0.5  # quantized (not a copy), and close on the tiny GPT's small logits


def test_hqq_and_gptq(gpt_onnx: Path, tmp_path: Path) -> None:
    feeds = _feeds(gpt_onnx)
    ref = _logits(gpt_onnx, feeds)
    for algo, bs in (("hqq", 32), ("gptq", 16)):
        dst = tmp_path / f"{algo}.onnx"
        calib = [_feeds(gpt_onnx, seed=s) for s in range(2)] if algo == "gptq" else None
        convert_precision(
            gpt_onnx, dst, "int4", int4=Int4Options(block_size=bs, algorithm=algo), calibration_feeds=calib
        )
        model = onnx.load(str(dst))
        assert any(n.op_type == "MatMulNBits" for n in model.graph.node) and not _float_weight_nodes(model)
        assert np.mean(ref.argmax(-1) == _logits(dst, feeds).argmax(-1)) >= 0.9
    with pytest.raises(ValueError, match="needs calibration_feeds"):
        convert_precision(gpt_onnx, tmp_path / "g.onnx", "int4", int4=Int4Options(algorithm="gptq"))
    # hidden 32 with 32-value blocks: one block per column, which ORT's GPTQ packing cannot take
    with pytest.raises(ValueError, match=r"odd number of 32-value blocks.*block_size 16"):
        convert_precision(
            gpt_onnx, tmp_path / "g.onnx", "int4", int4=Int4Options(algorithm="gptq"), calibration_feeds=[feeds]
        )


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_layer_against_float64_oracle(tmp_path: Path, trans_b: int) -> None:
    """y = x @ W + b with odd sizes (K = 37: a partial last block); every weight moves by at most half a step of
    its block's asymmetric 4-bit grid, so |y_int4 - y| <= sum_k |x_k| * step(k, n) / 2 (float64 bound)."""
    rng = np.random.default_rng(7)
    m, k, n, bs = 5, 37, 23, 16
    w = rng.normal(size=(k, n))  # (K, N)
    b = rng.normal(size=n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    stored = w.T if trans_b else w
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(stored.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")],
    )
    src = tmp_path / "fc.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), src)
    dst = tmp_path / "fc4.onnx"
    convert_precision(src, dst, "int4", int4=Int4Options(block_size=bs, accuracy_level=1, embeddings=False))
    assert [n.op_type for n in onnx.load(str(dst)).graph.node] == ["MatMulNBits", "Add"]
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w32 = w.astype(np.float32).astype(np.float64)
    ref = x.astype(np.float64) @ w32 + b.astype(np.float32)
    step = np.zeros_like(w32)  # (K, N): the grid step of the block holding each weight (range includes 0)
    for s in range(0, k, bs):
        blk = w32[s : s + bs]
        step[s : s + bs] = (np.maximum(blk.max(0), 0) - np.minimum(blk.min(0), 0)) / 15
    bound = np.abs(x.astype(np.float64)) @ (step / 2) + 1e-4
    err = np.abs(got - ref)
    assert err.max() > 1e-3  # really quantized
    assert np.all(err <= bound), float((err - bound).max())


def test_tied_lm_head_is_quantized(tmp_path: Path) -> None:
    """GPT-2 ties the LM head to the embedding table: Gather(W) feeds the blocks, MatMul(h, Transpose(W)) gives
    the logits. The head must still become MatMulNBits (no fp32 table left for it) and match a float64 oracle."""
    rng = np.random.default_rng(3)
    v, h = 41, 32  # (V, H): odd vocabulary
    w = rng.normal(size=(v, h)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["W", "ids"], ["e"], name="wte"),
        helper.make_node("Transpose", ["W"], ["Wt"], name="tr", perm=[1, 0]),
        helper.make_node("MatMul", ["e", "Wt"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, v])],
        [numpy_helper.from_array(w, "W")],
    )
    src = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), src)
    assert lm_head_node(onnx.load(str(src))) == "head"
    for embeddings in (True, False):
        dst = tmp_path / f"q{embeddings}.onnx"
        convert_precision(src, dst, "int4", int4=Int4Options(block_size=16, accuracy_level=1, embeddings=embeddings))
        model = onnx.load(str(dst))
        ops = [n.op_type for n in model.graph.node]
        assert "Transpose" not in ops and "MatMulNBits" in ops
        assert ("GatherBlockQuantized" in ops) == embeddings
        assert _float_weight_nodes(model) == ({} if embeddings else {"wte": "Gather"})
        ids = np.array([0, 5, 40], np.int64)
        got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        ref = w[ids].astype(np.float64) @ w.T.astype(np.float64)  # (3, V)
        assert np.abs(got - ref).max() > 1e-3  # really quantized
        assert np.array_equal(got.argmax(-1), ref.argmax(-1))  # each row's own token scores highest


@pytest.mark.parametrize(
    ("int4", "key", "says"),
    [
        ({"block_size": 48}, "int4.block_size", "power of 2"),
        ({"block_size": 8}, "int4.block_size", "greater than or equal to 16"),
        ({"algorithm": "awq"}, "int4.algorithm", "known: rtn, hqq, gptq"),
        ({"accuracy_level": 7}, "int4.accuracy_level", "less than or equal to 4"),
        ({"blocksize": 32}, "int4.blocksize", "unknown key"),
    ],
)
def test_bad_int4_profile_field_is_one_line(tmp_path: Path, int4, key, says) -> None:
    data = load_target("raspberry-pi-5").model_dump(mode="json")
    data.update(name="my-pi", int4=int4)
    path = tmp_path / "my-pi.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TargetError) as e:
        load_target(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and key in msg and says in msg


def test_int4_options_checked_for_api_callers() -> None:
    for bad in ({"block_size": 48}, {"algorithm": "awq"}, {"accuracy_level": 5}, {"lm_head": "int2"}):
        with pytest.raises(ValueError, match="int4"):
            Int4Options(**bad)


def test_bad_lm_head_option_is_one_line(tmp_path: Path, tiny_models) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models['gpt2']}}}\ntargets: [host-cpu]\n"
        "stages: [export, {quantize: {precision: int4, int4: {lm_head: int2}}}]\n"
    )
    with pytest.raises(ConfigError) as e:
        pipeline.validate_config(cfg)
    assert "\n" not in str(e.value) and "stages[1].quantize.int4.lm_head" in str(e.value)
    assert "int4, int8, fp32" in str(e.value)
