"""Per-layer sensitivity (quantize and prune) and measured mixed precision on a tiny random BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import pipeline
from pipeline.errors import StageError
from pipeline.sensitivity.config import FidelityBudget, SensitivityOptions
from pipeline.sensitivity.quantize import Evidence, measured_convert, output_fidelity
from runtimes.profiling import NodeProfile, attribute

TARGET = "raspberry-pi-5"  # int8 by default
CAL = {"samples": 8, "heldout": 16, "max_length": 24}


def _cfg(model: Path, stages: list) -> dict:
    return {"model": {"path": str(model)}, "targets": [TARGET], "calibration": CAL, "stages": stages}


# ------------------------------------------------------------------------------------------- pure functions


def test_attribute_takes_fused_names_and_the_longest_owner():
    prof = NodeProfile(
        node_ms={
            "n16_MatMul_quant": 2.0,  # int8 form of n16_MatMul
            "n16_MatMul_quant_scales_mul": 0.5,
            "n1_MatMul": 1.0,  # must not go to n16 (nor n16 to n1)
            "n40_MatMul/MatMulScaleFusion/": 0.25,
            "SkipLayerNormalization_token_3": 4.0,  # renamed by a fusion: nobody's
            "n160_MatMul": 8.0,  # extends n16 without a separator: not n16's
        },
        total_ms=15.75,
        runs=1,
    )
    got = attribute(prof, {"a": ["n16_MatMul"], "b": ["n1_MatMul", "n40_MatMul"], "c": ["n99_MatMul"]})
    assert got == {"a": 2.5, "b": 1.25, "c": 0.0}


def test_output_fidelity_matches_a_float64_oracle_on_odd_sizes():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(1, s, 7)).astype(np.float32) for s in (5, 3, 9)]
    got = [r + 0.1 * rng.normal(size=r.shape).astype(np.float32) for r in ref]
    feeds = [{"attention_mask": np.array([[1] * (r.shape[1] - 1) + [0]])} for r in ref]
    fid = output_fidelity(ref, got, feeds, "last_hidden_state")
    cos = []
    for r, g, f in zip(ref, got, feeds):
        m = f["attention_mask"][0].astype(bool)
        a, b = r[0][m].astype(np.float64).mean(0), g[0][m].astype(np.float64).mean(0)
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert fid["cos_mean"] == pytest.approx(np.mean(cos), abs=1e-12)
    assert fid["cos_min"] == pytest.approx(np.min(cos), abs=1e-12)
    tok = [
        (x @ y) / np.linalg.norm(x) / np.linalg.norm(y)
        for r, g, f in zip(ref, got, feeds)
        for x, y in zip(
            r[0][f["attention_mask"][0].astype(bool)].astype(np.float64),
            g[0][f["attention_mask"][0].astype(bool)].astype(np.float64),
        )
    ]
    assert fid["token_cos_min"] == pytest.approx(min(tok), abs=1e-9)
    logits = output_fidelity(ref, got, feeds, "logits")  # per-token cosine for logits
    assert logits["cos_mean"] == pytest.approx(np.mean(tok), abs=1e-12)


def test_mixed_needs_a_budget_and_the_budget_a_mixed():
    from pipeline.stages.quantize import QuantizeConfig

    with pytest.raises(ValueError, match="go together"):
        QuantizeConfig(mixed="auto")
    with pytest.raises(ValueError, match="go together"):
        QuantizeConfig(budget={"min_cos_mean": 0.99})
    with pytest.raises(ValueError):
        QuantizeConfig(mixed="auto", budget={"min_cos_mean": 1.5})


# ------------------------------------------------------------------------------------------- quantize


@pytest.fixture(scope="module")
def sens_run(tiny_models, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sens") / "r"
    stages = [{"export": {}}, {"quantize": {"precision": "int8", "sensitivity": {"samples": 8}}}]
    report = pipeline.run(_cfg(tiny_models["bert"], stages), workdir=run_dir, progress=False)
    return run_dir, report


def test_sensitivity_table_has_one_labelled_row_per_unit(sens_run):
    run_dir, report = sens_run
    q = next(s for s in report["stages"] if s["name"] == "quantize")["metrics"]["targets"][TARGET]
    rows = q["sensitivity"]["rows"]
    src = onnx.load(str(next((run_dir / "stages").glob("01-export/*/model.onnx"))))
    inits = {t.name for t in src.graph.initializer}
    weight_nodes = [
        n.name
        for n in src.graph.node
        if (n.op_type == "MatMul" and n.input[1] in inits) or (n.op_type == "Gather" and n.input[0] in inits)
    ]
    assert sorted(n for r in rows for n in r["nodes"]) == sorted(weight_nodes)  # one row per weight node
    roles = ("q", "k", "v", "o", "ffn_in", "ffn_out")
    assert [r["unit"] for r in rows] == [
        "embeddings.word_embeddings",
        "embeddings.token_type_embeddings",
        "embeddings.position_embeddings",
        *[f"block{b}.{r}" for b in range(2) for r in roles],
    ]
    assert all(r["sensitivity"] >= 0 and 0 <= r["latency_share"] <= 1 for r in rows)
    lat = q["sensitivity"]["latency"]
    assert 0 < lat["attributed_share_fp32"] <= 1 + 1e-9
    # the one-unit models are real: quantizing a big matrix moves the output, and never more than all of them
    assert max(r["sensitivity"] for r in rows) > 1e-9
    md = (run_dir / "report.md").read_text()
    assert "### quantize sensitivity: raspberry-pi-5" in md and "| block1.ffn_out |" in md
    assert (run_dir / TARGET / "sensitivity.png").stat().st_size > 1000
    assert "sensitivity_plot" in json.loads((run_dir / "report.json").read_text())["targets"][TARGET]["files"]


def _evidence(model_dir: Path):
    """Calibration-like feeds and the dense PyTorch reference, built here independently of the stage."""
    from exporters.onnx import torch_reference
    from pipeline.models import load_model
    from pipeline.stages._common import to_numpy_feeds

    loaded = load_model(model_dir, "feature-extraction")
    texts = ["the quick brown fox jumps over the lazy dog", "a small model runs on an edge device", "hello world"]
    texts += ["time flies like an arrow", "all models are wrong but some are useful", "we prune heads"]
    io = {"input_names": ["input_ids", "attention_mask", "token_type_ids"], "output_names": ["last_hidden_state"]}
    feeds = []
    for t in texts:
        enc = loaded.tokenizer([t], return_tensors="pt")
        feeds.append(to_numpy_feeds(dict(enc), io))
    ref = [torch_reference(loaded, f)["last_hidden_state"] for f in feeds]
    return loaded, Evidence(feeds, ref, "last_hidden_state", loaded.model)


def _dense_cos(path: Path, ev: Evidence) -> float:
    import onnxruntime as ort

    from runtimes.fidelity import mean_pool

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cos = []
    for f, r in zip(ev.feeds, ev.reference):
        g = sess.run(["last_hidden_state"], f)[0]
        cos.append(float(np.sum(mean_pool(r, f["attention_mask"]) * mean_pool(g, f["attention_mask"]))))
    return float(np.mean(cos))


def test_mixed_keeps_the_most_sensitive_unit_first_and_meets_the_budget_as_measured(sens_run, tiny_models, tmp_path):
    run_dir, _ = sens_run
    src = next((run_dir / "stages").glob("01-export/*/model.onnx"))
    _, ev = _evidence(tiny_models["bert"])
    kw = {"int8_op_types": ("MatMul", "Gemm", "Gather"), "weight_type": "u8"}
    opts = SensitivityOptions(samples=6, profile_runs=1)
    uniform = measured_convert(src, tmp_path / "u" / "model.onnx", "int8", kw, options=opts, budget=None,
                               evidence=ev, work_dir=tmp_path)  # fmt: skip
    u = uniform.metrics["sensitivity"]["uniform"]["cos_mean"]
    assert u < 1 - 1e-7  # int8 changes the numbers: a budget between uniform and fp32 exists
    budget = FidelityBudget(min_cos_mean=1 - (1 - u) / 3)
    dst = tmp_path / "m" / "model.onnx"
    res = measured_convert(src, dst, "int8", kw, options=opts, budget=budget, evidence=ev, work_dir=tmp_path)
    mixed, rows = res.metrics["mixed"], res.metrics["sensitivity"]["rows"]
    assert mixed["kept_fp32"], "a budget tighter than uniform int8 keeps at least one unit"
    assert mixed["kept_fp32"][0] == max(rows, key=lambda r: r["sensitivity"])["unit"]
    ranked = sorted(rows, key=lambda r: -r["sensitivity"])
    assert mixed["kept_fp32"] == [r["unit"] for r in ranked[: len(mixed["kept_fp32"])]]
    # measured, not predicted: the file written meets the budget when measured here, and is what was reported
    measured = _dense_cos(dst, ev)
    assert measured >= budget.min_cos_mean
    assert measured == pytest.approx(mixed["cos_mean"], abs=1e-9)
    out = onnx.load(str(dst))
    by_name = {n.name: n.op_type for n in out.graph.node}
    kept_nodes = {n for r in rows if r["kept_fp32"] for n in r["nodes"]}
    for n in kept_nodes:
        assert by_name.get(n) in ("MatMul", "Gather"), f"{n} should stay fp32"
    assert all(
        f"{n}_quant" in by_name for r in rows if not r["kept_fp32"] and r["role"] != "embeddings" for n in r["nodes"]
    )
    assert 0 < mixed["kept_params_share"] < 1


def test_prune_sensitivity_and_an_unmeetable_budget(tiny_models, tmp_path):
    """Prune sensitivity per block on structured pruning; then a budget the pruned model cannot meet even with
    every unit in fp32 fails quantize with one line and writes no model."""
    prune = {"prune": {"method": "magnitude", "pattern": "structured", "structured_unit": "heads+ffn",
                       "sparsity": 0.5, "strict": False, "sensitivity": {"granularity": "matmul", "samples": 6}}}  # fmt: skip
    run_dir = tmp_path / "r"
    report = pipeline.run(_cfg(tiny_models["bert"], [prune, {"export": {}}]), workdir=run_dir, progress=False)
    s = next(r for r in report["stages"] if r["name"] == "prune")["metrics"]["sensitivity"]
    assert s["granularity"] == "block" and "structured" in s["note_granularity"]
    assert [r["unit"] for r in s["rows"]] == ["block0", "block1"]
    assert all(r["sensitivity"] > 1e-6 and r["params"] > 0 for r in s["rows"])
    md = (run_dir / "report.md").read_text()
    assert "### prune sensitivity" in md
    plot = md.split("![sensitivity ](")[1].split(")")[0]
    assert (run_dir / plot).is_file()

    published = (run_dir / TARGET / "model.onnx").read_bytes()
    quant = {"quantize": {"precision": "int8", "sensitivity": {"granularity": "block", "samples": 4, "profile_runs": 1},
                          "mixed": "auto", "budget": {"min_cos_mean": 0.99999}}}  # fmt: skip
    with pytest.raises(StageError, match=r"cannot be met: with all \d+ units kept in fp32 the model measures") as e:
        pipeline.run(_cfg(tiny_models["bert"], [prune, {"export": {}}, quant]), workdir=run_dir, progress=False)
    assert "\n" not in str(e.value)
    assert (run_dir / TARGET / "model.onnx").read_bytes() == published  # no good artifact overwritten


def test_prune_sensitivity_per_matrix_unstructured(tiny_models, tmp_path):
    prune = {"prune": {"method": "magnitude", "sparsity": 0.5, "strict": False, "sensitivity": {"granularity": "matmul", "samples": 4}}}  # fmt: skip
    report = pipeline.run(_cfg(tiny_models["bert"], [prune]), workdir=tmp_path / "r", progress=False)
    rows = next(r for r in report["stages"] if r["name"] == "prune")["metrics"]["sensitivity"]["rows"]
    roles = ("q", "k", "v", "o", "ffn_in", "ffn_out")
    assert [r["unit"] for r in rows] == [f"block{b}.{r}" for b in range(2) for r in roles]
    # magnitude 50 %: each matrix loses about half its weights (ties aside)
    assert all(r["params"] > 0 and r["sensitivity"] > 0 for r in rows)


def test_nodes_to_exclude_keeps_exactly_those_nodes_in_fp32_on_both_int8_paths(sens_run, tmp_path):
    from exporters.quantize import convert_precision

    run_dir, _ = sens_run
    src = next((run_dir / "stages").glob("01-export/*/model.onnx"))
    g = onnx.load(str(src)).graph
    inits = {t.name for t in g.initializer}
    linear = [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in inits]
    rng = np.random.default_rng(0)
    feeds = [
        {"input_ids": rng.integers(5, 40, (1, 7)), "attention_mask": np.ones((1, 7), np.int64),
         "token_type_ids": np.zeros((1, 7), np.int64)}
        for _ in range(2)
    ]  # fmt: skip
    for precision in ("int8", "int8-static"):
        for exclude in ([linear[2]], linear):  # one node; every node (an empty nodes_to_quantize is "all" to ORT)
            dst = tmp_path / precision / f"{len(exclude)}.onnx"
            rep = convert_precision(src, dst, precision, calibration_feeds=feeds, nodes_to_exclude=exclude)
            assert rep.nodes_quantized == len(linear) - len(exclude), (precision, exclude)
            out = onnx.load(str(dst)).graph
            producer = {o: n for n in out.node for o in n.output}
            for n in out.node:
                if n.name in exclude:  # still a float MatMul reading the fp32 initializer directly
                    assert n.op_type == "MatMul" and n.input[1] not in producer


def test_an_excluded_gemm_stays_fp32_on_the_dynamic_path(tmp_path):
    """quantize_dynamic renames a Gemm to '<name>_MatMul' before it checks exclusions (GPT-2's Conv1D exports
    as Gemm): excluding the Gemm's own name must still keep it fp32."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters.quantize import convert_precision

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(5, 7)).astype(np.float32), "w1")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="g1", transB=1),
            helper.make_node("Gemm", ["h", "w2t"], ["y"], name="g2", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [w1, numpy_helper.from_array(rng.normal(size=(5, 5)).astype(np.float32), "w2t")],
    )
    src = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    assert convert_precision(src, tmp_path / "all.onnx", "int8").nodes_quantized == 2
    assert convert_precision(src, tmp_path / "one.onnx", "int8", nodes_to_exclude=["g1"]).nodes_quantized == 1
    out = onnx.load(str(tmp_path / "one.onnx")).graph
    ops = {n.name: n.op_type for n in out.node}
    assert "MatMulInteger" not in {op for name, op in ops.items() if name.startswith("g1")}  # fp32 (maybe as MatMul)
    assert "MatMulInteger" in {op for name, op in ops.items() if name.startswith("g2")}
