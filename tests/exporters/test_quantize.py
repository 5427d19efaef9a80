"""Tests for exporters.quantize: each precision, atomic/deterministic output, and the two
known collapse modes (anchors §1.10 / §3.7) shown to break the naive path but not ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.quantize import DEFAULT_KEEP_FP32, QuantizeReport, convert_precision
from runtimes.compare import compare

D, F = 48, 80  # hidden and FFN widths: odd-ish, not powers of two


def _ln_decomposed(prefix: str, x: str, d: int, rng: np.random.Generator) -> tuple[list, list, str]:
    """Decomposed LayerNorm over the last axis, as legacy/ViT exports emit it.

    mean = ReduceMean(x); c = x - mean; var = ReduceMean(Pow(c, 2)); y = c / Sqrt(var + eps) * g + b
    """
    p = prefix
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), f"{p}two"),
        numpy_helper.from_array(np.array(1e-5, np.float32), f"{p}eps"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), f"{p}g"),
        numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), f"{p}b"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [x], [f"{p}mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", [x, f"{p}mean"], [f"{p}c"]),
        helper.make_node("Pow", [f"{p}c", f"{p}two"], [f"{p}sq"]),  # overflows fp16 for |c| > 256
        helper.make_node("ReduceMean", [f"{p}sq"], [f"{p}var"], axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{p}var", f"{p}eps"], [f"{p}ve"]),
        helper.make_node("Sqrt", [f"{p}ve"], [f"{p}std"]),
        helper.make_node("Div", [f"{p}c", f"{p}std"], [f"{p}n"]),
        helper.make_node("Mul", [f"{p}n", f"{p}g"], [f"{p}ng"]),
        helper.make_node("Add", [f"{p}ng", f"{p}b"], [f"{p}out"]),
    ]
    return nodes, inits, f"{p}out"


def _linear(p: str, x: str, din: int, dout: int, rng: np.random.Generator) -> tuple[list, list, str]:
    inits = [
        numpy_helper.from_array((rng.standard_normal((din, dout)) / np.sqrt(din)).astype(np.float32), f"{p}W"),
        numpy_helper.from_array((0.02 * rng.standard_normal(dout)).astype(np.float32), f"{p}bias"),
    ]
    nodes = [
        helper.make_node("MatMul", [x, f"{p}W"], [f"{p}mm"]),
        helper.make_node("Add", [f"{p}mm", f"{p}bias"], [f"{p}y"]),
    ]
    return nodes, inits, f"{p}y"


def _block_model(path: Path, *, fused_ln: bool, seed: int = 0) -> Path:
    """Pre-LN transformer MLP block with a residual: (B, S, D) -> (B, S, D).

    x -> LN1 -> Linear(D,F) -> Relu -> Linear(F,D) -> Add(x, .) [residual] -> LN2 -> Linear(D,D) -> y
    """
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    if fused_ln:
        inits += [
            numpy_helper.from_array(np.ones(D, np.float32), "g1"),
            numpy_helper.from_array(np.zeros(D, np.float32), "b1"),
        ]
        nodes.append(helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["ln1"], axis=-1, epsilon=1e-5))
        ln1 = "ln1"
    else:
        n, i, ln1 = _ln_decomposed("ln1_", "x", D, rng)
        nodes += n
        inits += i
    n, i, h = _linear("fc1_", ln1, D, F, rng)
    nodes += n + [helper.make_node("Relu", [h], ["act"])]
    inits += i
    n, i, h2 = _linear("fc2_", "act", F, D, rng)
    nodes += n + [helper.make_node("Add", ["x", h2], ["res"])]  # (B, S, D) residual stream
    inits += i
    if fused_ln:
        inits += [
            numpy_helper.from_array(np.ones(D, np.float32), "g2"),
            numpy_helper.from_array(np.zeros(D, np.float32), "b2"),
        ]
        nodes.append(helper.make_node("LayerNormalization", ["res", "g2", "b2"], ["ln2"], axis=-1, epsilon=1e-5))
        ln2 = "ln2"
    else:
        n, i, ln2 = _ln_decomposed("ln2_", "res", D, rng)
        nodes += n
        inits += i
    n, i, y = _linear("out_", ln2, D, D, rng)
    nodes += n + [helper.make_node("Identity", [y], ["y"])]
    inits += i
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgepipe-test")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    if not optimize:
        # Execute the graph as written: ORT's LayerNormFusion would otherwise re-fuse a decomposed
        # fp16 norm into LayerNormalization (fp32 inside) and hide the overflow that EPs such as
        # TensorRT/NNAPI, which run the ops as given, do hit.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _massive(rng: np.random.Generator, b: int = 2, s: int = 7, scale: float = 400.0) -> np.ndarray:
    """(B, S, D) activations where token 0 carries massive values (as BOS/CLS tokens do in real LMs)."""
    x = rng.standard_normal((b, s, D)).astype(np.float32)
    x[:, 0, :] *= scale
    return x


def _cos_min(ref: np.ndarray, got: np.ndarray) -> float:
    return compare({"y": ref}, {"y": got}, atol=np.inf)[0].cosine_min


@pytest.fixture
def block(tmp_path: Path) -> Path:
    return _block_model(tmp_path / "block.onnx", fused_ln=False)


def test_bad_precision_and_missing_feeds(block: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'int3'"):
        convert_precision(block, tmp_path / "o.onnx", "int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="calibration_feeds"):
        convert_precision(block, tmp_path / "o.onnx", "int8-static")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-static"])
def test_each_precision_runs_and_is_deterministic(block: Path, tmp_path: Path, precision: str) -> None:
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 9, D)).astype(np.float32)} for _ in range(4)]
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    rep = convert_precision(block, a, precision, calibration_feeds=feeds)  # type: ignore[arg-type]
    convert_precision(block, b, precision, calibration_feeds=feeds)  # type: ignore[arg-type]
    assert isinstance(rep, QuantizeReport) and rep.precision == precision
    assert rep.size_bytes == a.stat().st_size
    assert a.read_bytes() == b.read_bytes(), "same input must give byte-identical output"
    assert [p.name for p in a.parent.iterdir()] == ["m.onnx"], "no temp files may be left behind"
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    ref, got = _run(block, x), _run(a, x)
    if precision == "fp32":
        assert rep.nodes_quantized == 0
        np.testing.assert_array_equal(got, ref)
    else:
        assert rep.nodes_quantized == 3 if precision.startswith("int8") else rep.nodes_quantized >= 3
        assert _cos_min(ref, got) > 0.99
    if precision == "fp16":
        # norm arithmetic and the residual Add stayed fp32
        assert {"Pow", "Sqrt", "ReduceMean", "Add"} <= set(rep.ops_kept_fp32)
        onnx.checker.check_model(onnx.load(str(a)), full_check=True)  # incl. topological order
        init_types = {t.data_type for t in onnx.load(str(a)).graph.initializer}
        assert TensorProto.FLOAT16 in init_types


def test_fp32_optimized_keeps_parity(block: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, 6, D)).astype(np.float32)}]
    rep = convert_precision(block, tmp_path / "o.onnx", "fp32", calibration_feeds=feeds, optimize_fp32=True)
    assert "ORT_ENABLE_EXTENDED" in rep.notes[0]
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "o.onnx", x), _run(block, x), atol=1e-5)


def test_int8_static_keeps_residual_and_norms_float(tmp_path: Path) -> None:
    src = _block_model(tmp_path / "f.onnx", fused_ln=True)
    rng = np.random.default_rng(3)
    rep = convert_precision(src, tmp_path / "q.onnx", "int8-static", calibration_feeds=[{"x": _massive(rng)}])
    out = onnx.load(str(tmp_path / "q.onnx"))
    producer = {o: n for n in out.graph.node for o in n.output}
    residual = next(n for n in out.graph.node if n.op_type == "Add" and "x" in n.input)
    for n in [residual, *(n for n in out.graph.node if n.op_type == "LayerNormalization")]:
        # residual stream and norm inputs are never quantized (only MatMul inputs/outputs get Q/DQ)
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), n.name
    consumers_of_res = [n.op_type for n in out.graph.node if residual.output[0] in n.input]
    assert consumers_of_res == ["LayerNormalization"]
    assert rep.nodes_quantized == 3


# ---------------------------------------------------------------- regression: anchors §1.10 / §3.7


def _run_as_written(path: Path, x: np.ndarray) -> np.ndarray:
    """Execute every op in its declared dtype with onnx's reference evaluator (NumPy).

    ORT's CPU EP has no fp16 kernels for Pow/ReduceMean/Sqrt: its InsertCastTransformer silently
    computes such chains in fp32, which hides the overflow that EPs with native fp16 kernels
    (TensorRT, NNAPI, CoreML, Arm fp16 MLAS) hit. The reference evaluator runs the graph as written.
    """
    from onnx.reference import ReferenceEvaluator

    with np.errstate(over="ignore", invalid="ignore"):
        return ReferenceEvaluator(str(path)).run(["y"], {"x": x})[0]


def test_fp16_decomposed_layernorm_overflow_regression(block: Path, tmp_path: Path) -> None:
    """Naive whole-graph fp16 makes Pow(x - mean, 2) overflow to inf for |x| ~ 400; ours keeps the norm in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    rng = np.random.default_rng(4)
    x = _massive(rng)
    ref = _run(block, x)
    naive = tmp_path / "naive.onnx"
    naive_model = OnnxModel(convert_float_to_float16(onnx.load(str(block)), keep_io_types=True))
    naive_model.topological_sort()  # the converter appends its Casts last; the evaluator needs topological order
    onnx.save(naive_model.model, str(naive))
    naive_out = _run_as_written(naive, x)
    ours = tmp_path / "ours.onnx"
    convert_precision(block, ours, "fp16")
    ours_out = _run_as_written(ours, x)
    # and ours also runs in ORT (fp16 MatMul + Casts) with the same result
    np.testing.assert_allclose(_run(ours, x), ours_out, atol=0.05)

    naive_row = compare({"y": ref}, {"y": naive_out}, atol=0.05, min_cosine=0.99)[0]
    ours_row = compare({"y": ref}, {"y": ours_out}, atol=0.05, min_cosine=0.99)[0]
    assert not naive_row.ok and not np.all(np.isfinite(naive_out[:, 0]) & (np.abs(naive_out[:, 0] - ref[:, 0]) < 1)), (
        "naive fp16 should overflow on token 0"
    )
    assert ours_row.ok, ours_row
    # Tokens without massive values are fine either way: the failure is specifically the overflow.
    assert _cos_min(ref[:, 1:], naive_out[:, 1:]) > 0.99


def test_int8_residual_add_collapse_regression(tmp_path: Path) -> None:
    """Static QDQ on all op types quantizes the residual stream per-tensor; token 0's massive values
    then wipe out every other token. Quantizing only the linear layers stays close."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src = _block_model(tmp_path / "f.onnx", fused_ln=True)
    rng = np.random.default_rng(5)
    calib = [{"x": _massive(rng)} for _ in range(8)]
    x = _massive(rng)
    ref = _run(src, x)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib)

        def get_next(self):
            return next(self._it, None)

    all_ops = sorted({n.op_type for n in onnx.load(str(src)).graph.node})
    naive = tmp_path / "naive.onnx"
    quantize_static(
        str(src),
        str(naive),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=all_ops,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    ours = tmp_path / "ours.onnx"
    convert_precision(src, ours, "int8-static", calibration_feeds=calib)

    naive_cos = _cos_min(ref, _run(naive, x, optimize=False))
    ours_cos = _cos_min(ref, _run(ours, x, optimize=False))
    assert ours_cos > 0.98, ours_cos
    assert naive_cos < 0.8, naive_cos
    assert ours_cos - naive_cos > 0.2


def test_default_keep_list_covers_norms_and_softmax() -> None:
    assert {"LayerNormalization", "Softmax", "SkipLayerNormalization"} <= set(DEFAULT_KEEP_FP32)


def test_int8_op_types_guard_and_gather(tmp_path: Path) -> None:
    from tests.runtimes.test_session import sample_encodings, tiny_encoder

    src = tiny_encoder(tmp_path / "enc.onnx")
    with pytest.raises(ValueError, match="Add"):
        convert_precision(src, tmp_path / "o.onnx", "int8", int8_op_types=("MatMul", "Add"))
    plain = convert_precision(src, tmp_path / "p.onnx", "int8")
    emb = convert_precision(src, tmp_path / "e.onnx", "int8", int8_op_types=("MatMul", "Gemm", "Gather"))
    assert (plain.nodes_quantized, emb.nodes_quantized) == (1, 2)
    assert emb.size_bytes < plain.size_bytes  # the (37, 24) fp32 table became int8
    enc = {k: v.astype(np.int64) for k, v in sample_encodings().items() if k != "token_type_ids"}
    ref = ort.InferenceSession(str(src)).run(None, enc)[0]
    got = ort.InferenceSession(str(tmp_path / "e.onnx")).run(None, enc)[0]
    assert compare({"h": ref}, {"h": got}, atol=np.inf, mask=enc["attention_mask"])[0].cosine_min > 0.99


def test_int8_static_output_quantization_switch(block: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.standard_normal((1, 9, D)).astype(np.float32)} for _ in range(4)]
    for flag, expect_q_after_matmul in ((False, 0), (True, 3)):
        dst = tmp_path / f"s{flag}.onnx"
        convert_precision(block, dst, "int8-static", calibration_feeds=feeds, quantize_matmul_outputs=flag)
        out = onnx.load(str(dst))
        producer = {o: n for n in out.graph.node for o in n.output}
        q_after_mm = sum(
            1
            for n in out.graph.node
            if n.op_type == "QuantizeLinear"
            and producer.get(n.input[0]) is not None
            and producer[n.input[0]].op_type == "MatMul"
        )
        assert q_after_mm == expect_q_after_matmul


# --------------------------------------------------------------------------- int8 numerics on any CPU (issue 11)


def _mlas_u8s8_avx2(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(M, K) u8 @ (K, N) s8 -> (M, N) int32 as ORT's x86 u8s8 kernel computes it without AVX-VNNI.

    ``vpmaddubsw`` multiplies adjacent (k, k+1) byte pairs and adds the two products into an int16
    with saturation; ``vpmaddwd`` then accumulates the int16 sums in int32. (With VNNI, ``vpdpbusd``
    accumulates every product in int32: exact.)
    """
    k = a.shape[1] + a.shape[1] % 2
    a = np.pad(a.astype(np.int64), [(0, 0), (0, k - a.shape[1])])
    w = np.pad(w.astype(np.int64), [(0, k - w.shape[0]), (0, 0)])
    pairs = a[:, 0::2, None] * w[None, 0::2] + a[:, 1::2, None] * w[None, 1::2]  # (M, K/2, N)
    return np.clip(pairs, -32768, 32767).sum(1)


def _quantized_tiny_encoder(path: Path, ids: np.ndarray, mask: np.ndarray, *, saturate: bool) -> np.ndarray:
    """float64 oracle of the int8 tiny encoder: u8 embedding rows @ int8 weights (MatMulInteger), then Tanh * mask."""
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    a = init["emb_quantized"][ids.reshape(-1)]  # (B*S, H) u8 activations straight from the quantized table
    w, a_zp, w_zp = init["W_quantized"], int(init["emb_zero_point"]), init["W_zero_point"].astype(np.int64)
    raw = _mlas_u8s8_avx2(a, w) if saturate else a.astype(np.int64) @ w.astype(np.int64)
    # zero-point corrections are exact in every kernel: (a - za)(w - zw) = aw - za*sum(w) - zw*sum(a) + K*za*zw
    acc = raw - a_zp * w.astype(np.int64).sum(0) - np.outer(a.astype(np.int64).sum(1), w_zp) + a.shape[1] * a_zp * w_zp
    h = np.tanh(acc * float(init["emb_scale"]) * init["W_scale"].astype(np.float64))
    return h.reshape(*ids.shape, -1) * mask[..., None]


@pytest.mark.parametrize("weight_type", ["s8", "u8", "s8-reduce-range"])
def test_int8_weight_types_and_the_u8s8_saturation_they_avoid(tmp_path: Path, weight_type: str) -> None:
    """Cause of cos 0.963 on AVX2-only hosts: u8 activations x s8 weights saturate int16 pair sums there.
    u8 weights (the x86 default) use the widening u8u8 kernel; 7-bit weights cannot reach the int16 limit."""
    from tests.runtimes.test_session import sample_encodings, tiny_encoder

    src = tiny_encoder(tmp_path / "enc.onnx")
    dst = tmp_path / "q.onnx"
    convert_precision(src, dst, "int8", int8_op_types=("MatMul", "Gather"), weight_type=weight_type)
    enc = {k: v.astype(np.int64) for k, v in sample_encodings().items() if k != "token_type_ids"}
    ref = ort.InferenceSession(str(src)).run(None, enc)[0].astype(np.float64)
    got = ort.InferenceSession(str(dst)).run(None, enc)[0].astype(np.float64)
    exact = _quantized_tiny_encoder(dst, enc["input_ids"], enc["attention_mask"], saturate=False)
    # this host's ORT computes the exact int8 result (VNNI or not: u8u8 / 7-bit / ARM are exact; only u8s8 on AVX2 is not)
    w = numpy_helper.to_array(next(t for t in onnx.load(str(dst)).graph.initializer if t.name == "W_quantized"))
    if weight_type != "s8":
        assert np.abs(got - exact).max() < 1e-4

    def cos_min(x: np.ndarray) -> float:
        return compare({"h": ref}, {"h": x.astype(np.float32)}, atol=np.inf, mask=enc["attention_mask"])[0].cosine_min

    assert cos_min(exact) > 0.99
    if weight_type == "u8":
        assert w.dtype == np.uint8  # u8 x u8: ORT's widening kernel, no int16 pair sums
    elif weight_type == "s8-reduce-range":
        assert w.dtype == np.int8 and np.abs(w.astype(np.int64)).max() <= 64
        worst = 255 * (np.abs(w[0::2]).astype(np.int64) + np.abs(w[1::2]).astype(np.int64)).max()
        assert worst <= 32767  # no pair of u8*s8 products can saturate int16, on any x86 kernel
        sat = _quantized_tiny_encoder(dst, enc["input_ids"], enc["attention_mask"], saturate=True)
        assert np.array_equal(sat, exact)
    else:  # full-range s8: what an AVX2-only host computes is measurably worse than the exact result
        assert w.dtype == np.int8 and np.abs(w).max() == 127
        sat = _quantized_tiny_encoder(dst, enc["input_ids"], enc["attention_mask"], saturate=True)
        assert cos_min(sat) < cos_min(exact) - 0.005


def test_profiles_choose_int8_weights_per_architecture() -> None:
    from targets import load_target
    from targets.cpu import host_int8_weight_type

    assert load_target("raspberry-pi-5").int8_weight_type == "s8"  # ARM: int32 dot products, full 8-bit weights
    assert load_target("android-arm64").int8_weight_type == "s8"
    # host-cpu describes this machine: the fastest exact type for the CPU the test runs on (CI's may lack VNNI)
    assert load_target("host-cpu").int8_weights == "host"
    assert load_target("host-cpu").int8_weight_type == host_int8_weight_type()
    # an x86 profile that says nothing stays u8: exact on CPUs with and without VNNI
    assert load_target("host-cpu").model_copy(update={"int8_weights": None}).int8_weight_type == "u8"


@pytest.mark.parametrize(
    ("machine", "features", "expected"),
    [
        ("x86_64", {"AVX2": True, "AVX512VNNI": True}, "s8"),  # vpdpbusd accumulates u8 x s8 in int32
        ("x86_64", {"AVX2": True, "AVX512VNNI": False}, "u8"),  # vpmaddubsw would saturate int16 pair sums
        ("AMD64", {"AVX2": True}, "u8"),  # Windows' name; no VNNI reported
        ("x86_64", {}, "u8"),  # features unknown: the type that is exact everywhere
        ("aarch64", {"ASIMD": True}, "s8"),
        ("arm64", {}, "s8"),  # macOS' name
        ("riscv64", {}, "u8"),
    ],
)
def test_host_int8_weight_type_follows_the_cpu(machine: str, features: dict[str, bool], expected: str) -> None:
    from targets.cpu import int8_weight_type_for

    assert int8_weight_type_for(machine, features) == expected


def test_host_weight_type_is_part_of_the_stage_cache_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`int8_weights: host` resolves per machine: a cache shared by a VNNI and a non-VNNI machine must not
    hand one's int8 model to the other, so the resolved type is in the run's input fingerprint."""
    import targets.cpu
    from pipeline.runner import _input_fingerprint
    from targets import load_target

    prof = {"host-cpu": load_target("host-cpu")}
    keys = {}
    for vnni in (True, False):
        monkeypatch.setattr(targets.cpu, "cpu_features", lambda v=vnni: {"AVX2": True, "AVX512VNNI": v})
        monkeypatch.setattr(targets.cpu.platform, "machine", lambda: "x86_64")
        keys[vnni] = _input_fingerprint(["a b"], tmp_path, prof)
    assert keys[True]["profiles"]["host-cpu"]["int8_weight_type"] == "s8"
    assert keys[False]["profiles"]["host-cpu"]["int8_weight_type"] == "u8"
    assert keys[True] != keys[False]


@pytest.mark.parametrize("precision", ["int8", "int8-static"])
def test_int8_bert_runs_add_and_layernorm_not_the_slow_skip_layernorm(
    tiny_models: dict[str, Path], tmp_path: Path, precision: str
) -> None:
    """Issue 11 item 7: ORT fuses each residual Add + LayerNormalization of a fully shape-annotated graph into
    SkipLayerNormalization, whose CPU kernel is ~7x slower; the int8 paths ship a graph it leaves unfused."""
    from exporters.onnx import dummy_feeds, export_onnx
    from pipeline.models import load_model

    res = export_onnx(load_model(tiny_models["bert"]), tmp_path / "fp32")
    feeds = dummy_feeds(res, 2, 9)

    def optimized_ops(path: Path) -> list[str]:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]

    assert onnx.load(str(res.path)).graph.value_info  # the export declares every intermediate shape ...
    assert "SkipLayerNormalization" in optimized_ops(res.path)  # ... which is what lets ORT fuse (test can fail)
    dst = tmp_path / f"{precision}.onnx"
    convert_precision(dst=dst, src=res.path, precision=precision, calibration_feeds=[feeds])
    ops = optimized_ops(dst)
    assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 5  # embeddings + 2 per layer
    ref = ort.InferenceSession(str(res.path)).run(None, feeds)[0]
    got = ort.InferenceSession(str(dst)).run(None, feeds)[0]
    assert compare({"h": ref}, {"h": got}, atol=np.inf)[0].cosine_min > 0.99
