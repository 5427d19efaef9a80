"""exporters.chunked_gather: large embedding tables quantized chunk by chunk before ORT's dynamic quantizer.

The oracle is ORT itself: ``convert_precision`` with the chunked path (threshold 0, chunks of a few rows that do not
divide the odd table sizes) must write the same initializers (bytes and types), the same nodes and the same outputs
as with every table left to ``quantize_dynamic``, for every int8 weight type and per_channel on and off, inline
and with external data. A float64 reference checks the numbers themselves."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters.chunked_gather as cg
from exporters.onnx import data_file, save_onnx
from exporters.quantize import INT8_WEIGHT_TYPES, _name_nodes, convert_precision

OPS = ("MatMul", "Gemm", "Gather")
V, H, P, G = 37, 29, 11, 23  # vocab, hidden, positions, second vocab: odd, and not multiples of the chunk rows
CHUNK_ROWS = 5


def _model(rng: np.random.Generator, table: np.ndarray | None = None) -> onnx.ModelProto:
    """Gather tables of every kind the chunked path meets.

    E (V, H): word table, its Gather output also a graph output; Pos (P, H): one table read by two Gathers;
    T (V, H): tied (also transposed into an LM head: not a Gather-only table, ORT's); Gm (G, H): its Gather output
    feeds a MatMul directly (ORT feeds it the u8 values: ORT's); W, W2 (H, 7): linear weights."""
    f = TensorProto.FLOAT
    E = table if table is not None else rng.standard_normal((V, H)).astype(np.float32) * 0.7 + 0.2
    inits = {
        "E": E,
        "Pos": rng.uniform(0.01, 0.5, (P, H)).astype(np.float32),  # all positive: the range is stretched to 0
        "T": rng.standard_normal((V, H)).astype(np.float32),
        "Gm": rng.standard_normal((G, H)).astype(np.float32),
        "W": rng.standard_normal((H, 7)).astype(np.float32),
        "W2": rng.standard_normal((H, 7)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["we"]),
        helper.make_node("Gather", ["Pos", "pos"], ["pe1"]),
        helper.make_node("Gather", ["Pos", "pos2"], ["pe2"]),
        helper.make_node("Add", ["we", "pe1"], ["s1"]),
        helper.make_node("Add", ["s1", "pe2"], ["s"]),
        helper.make_node("MatMul", ["s", "W"], ["y"]),
        helper.make_node("Gather", ["T", "ids"], ["te"]),
        helper.make_node("Add", ["s", "te"], ["st"]),
        helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]),
        helper.make_node("MatMul", ["st", "Tt"], ["logits"]),
        helper.make_node("Gather", ["Gm", "ids2"], ["ge"]),
        helper.make_node("MatMul", ["ge", "W2"], ["y2"]),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "n"]) for n in ("ids", "pos", "pos2", "ids2")]
    outs = [
        helper.make_tensor_value_info("y", f, ["b", "n", 7]),
        helper.make_tensor_value_info("logits", f, ["b", "n", V]),
        helper.make_tensor_value_info("y2", f, ["b", "n", 7]),
        helper.make_tensor_value_info("we", f, ["b", "n", H]),
    ]
    graph = helper.make_graph(nodes, "tables", ids, outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    shape = (2, 9)
    return {
        "ids": rng.integers(0, V, shape),
        "pos": rng.integers(0, P, shape),
        "pos2": rng.integers(0, P, shape),
        "ids2": rng.integers(0, G, shape),
    }


@pytest.fixture
def few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of CHUNK_ROWS rows of H floats: 37 rows -> 8 chunks, the last one 2 rows."""
    monkeypatch.setattr(cg, "CHUNK_BYTES", CHUNK_ROWS * H * 4)


def _written(path: Path) -> tuple[dict[str, tuple[int, bytes]], list[bytes]]:
    """(initializer name -> (type, values), sorted serialized nodes) of a model as saved."""
    m = onnx.load(str(path))
    inits = {t.name: (t.data_type, numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer}
    return inits, sorted(n.SerializeToString() for n in m.graph.node)


def _both(src: Path, out: Path, **kw):
    ref = convert_precision(src, out / "ort.onnx", "int8", int8_op_types=OPS, chunked_gather_bytes=None, **kw)
    got = convert_precision(src, out / "chunked.onnx", "int8", int8_op_types=OPS, chunked_gather_bytes=0, **kw)
    return ref, got


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_chunked_tables_are_bit_identical_to_ort(tmp_path: Path, few_rows: None, external: bool) -> None:
    rng = np.random.default_rng(7)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    save_onnx(_model(rng), src, external=external)
    feeds = _feeds(rng)
    for weight_type in INT8_WEIGHT_TYPES:
        for per_channel in (True, False):
            out = tmp_path / f"{weight_type}-{per_channel}"
            ref, got = _both(src, out, weight_type=weight_type, per_channel=per_channel)
            case = f"{weight_type}, per_channel={per_channel}"
            assert "chunk by chunk" not in " ".join(ref.notes)
            assert any("E 37x29, Pos 11x29" in n for n in got.notes), (case, got.notes)  # not T (tied), not Gm
            assert data_file(out / "chunked.onnx").is_file() == data_file(out / "ort.onnx").is_file() == external
            r_inits, r_nodes = _written(out / "ort.onnx")
            g_inits, g_nodes = _written(out / "chunked.onnx")
            assert g_inits == r_inits, case  # E/Pos _quantized, _scale, _zero_point and every other tensor
            assert g_nodes == r_nodes, case
            # sizes may differ by a few bytes: ORT's internal save/reload marks the tables it loaded back (ours,
            # made before it ran) with an explicit `data_location: DEFAULT`, the default value
            assert ref.nodes_quantized == got.nodes_quantized == 7, case
            assert r_inits["E_quantized"][0] == TensorProto.UINT8  # ORT's Gather path: u8 whatever the weight type
            a = ort.InferenceSession(str(out / "ort.onnx")).run(None, feeds)
            b = ort.InferenceSession(str(out / "chunked.onnx")).run(None, feeds)
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y, err_msg=case)


def _float64_reference(x: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Per-tensor asymmetric u8 in float64: range stretched to include 0, zero point round(-min / scale)."""
    x = x.astype(np.float64)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / 255.0
    zp = int(np.round(-lo / scale))
    return scale, zp, np.clip(np.round(x / scale) + zp, 0, 255)


@pytest.mark.parametrize("rows", [1, 4, 37])
def test_chunked_values_against_the_float64_reference(rows: int) -> None:
    rng = np.random.default_rng(rows)
    model = _model(rng)
    _name_nodes(model)
    table = numpy_helper.to_array(model.graph.initializer[0]).copy()  # E (37, 29)
    done = cg.prequantize_gather_tables(
        model, src_data=None, dst_data=None, op_types=OPS, excluded=(), min_bytes=0, chunk_bytes=rows * H * 4 - 3
    )  # a chunk a few bytes short of `rows` rows: rows - 1 rows a chunk (at least 1)
    e = next(t for t in done if t.name == "E")
    q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E_quantized"))
    scale, zp, ref = _float64_reference(table)
    assert (q.shape, q.dtype, e.zero_point) == ((V, H), np.uint8, zp)
    assert e.scale == pytest.approx(scale, rel=1e-6)
    assert np.abs(q.astype(np.int64) - ref).max() <= 1  # float32 division vs float64: ties may round apart
    err = np.abs((q.astype(np.float64) - zp) * e.scale - table)
    inside = (q > 0) & (q < 255)  # at the ends a value may round one step past the range and be clipped back
    assert err[inside].max() <= e.scale * (0.5 + 1e-4) and err.max() <= e.scale * (1 + 1e-4)
    assert [n.name for n in model.graph.initializer if n.name in ("E", "Pos")] == []  # the float tables are gone


def test_external_table_is_read_in_chunks_not_loaded(tmp_path: Path) -> None:
    """The float table stays in its data file: the pre-pass allocates a few chunks, not the 16 MiB table (numpy
    allocations are traced by tracemalloc)."""
    rng = np.random.default_rng(3)
    big = rng.standard_normal((4099, 1023)).astype(np.float32)  # 16.0 MiB, rows not a multiple of the chunk
    src = tmp_path / "model.onnx"
    save_onnx(_model(rng, table=big), src, external=True)
    model = onnx.load(str(src), load_external_data=False)
    _name_nodes(model)
    dst = tmp_path / "named" / "model.onnx"
    dst.parent.mkdir()
    tracemalloc.start()
    try:
        done = cg.prequantize_gather_tables(
            model, src_data=data_file(src), dst_data=data_file(dst), op_types=OPS, excluded=(),
            min_bytes=2**20, chunk_bytes=2**20,
        )  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [t.name for t in done] == ["E"]  # Pos, T, Gm are under 1 MiB (and T, Gm are ORT's anyway)
    assert peak < 6 * 2**20, peak
    onnx.save_model(model, str(dst))
    scale, zp, ref = _float64_reference(big)
    assert done[0].scale == pytest.approx(scale, rel=1e-6)
    q = numpy_helper.to_array(next(t for t in onnx.load(str(dst)).graph.initializer if t.name == "E_quantized"))
    assert done[0].zero_point == zp and np.abs(q.astype(np.int64) - ref).max() <= 1


def test_non_finite_table_is_refused_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    table = rng.standard_normal((V, H)).astype(np.float32)
    table[30, 4] = np.nan
    src = tmp_path / "model.onnx"
    onnx.save(_model(rng, table=table), str(src))
    with pytest.raises(ValueError, match="'E' holds non-finite"):
        convert_precision(src, tmp_path / "q.onnx", "int8", int8_op_types=OPS, chunked_gather_bytes=0)
    assert not (tmp_path / "q.onnx").exists()


def test_threshold_and_exclusions_leave_tables_to_ort() -> None:
    model = _model(np.random.default_rng(0))
    _name_nodes(model)
    pick = lambda **kw: [t.name for t in cg.gather_tables(model, **{"op_types": OPS, "excluded": (), **kw})]  # noqa: E731
    assert pick(min_bytes=0) == ["E", "Pos"]
    assert pick(min_bytes=V * H * 4) == ["E"]  # E is exactly at the threshold, Pos under it
    assert pick(min_bytes=None) == [] and pick(min_bytes=0, op_types=("MatMul",)) == []
    assert pick(min_bytes=0, excluded=("Gather_2",)) == ["E"]  # one of Pos's two Gathers stays fp32
    assert pick(min_bytes=0, op_types=("Gather", "Add")) == ["Gm"]  # E, Pos: ORT would quantize their readers (Adds)


def test_quantize_stage_setting_maps_to_the_api() -> None:
    from pipeline.stages.quantize import QuantizeConfig

    assert QuantizeConfig().chunked_embeddings_mb * 2**20 == cg.DEFAULT_CHUNKED_GATHER_BYTES
    assert QuantizeConfig(chunked_embeddings_mb=None).chunked_embeddings_mb is None
    with pytest.raises(ValueError):
        QuantizeConfig(chunked_embeddings_mb=-1)


def test_ort_never_holds_the_chunked_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ORT's quantizer is handed has neither the float table nor its u8 result as an initializer (ORT copies
    each initializer it loads about three times); the u8 table is a graph input there and comes back afterwards."""
    import onnxruntime.quantization as oq

    seen: list[tuple[set[str], set[str]]] = []
    real = oq.quantize_dynamic

    def spy(model_input, *args, **kwargs):
        g = onnx.load(str(model_input), load_external_data=False).graph
        seen.append(({t.name for t in g.initializer}, {i.name for i in g.input}))
        return real(model_input, *args, **kwargs)

    monkeypatch.setattr(oq, "quantize_dynamic", spy)
    src = tmp_path / "model.onnx"
    save_onnx(_model(np.random.default_rng(2)), src, external=True)
    convert_precision(src, tmp_path / "q.onnx", "int8", int8_op_types=OPS, chunked_gather_bytes=0)
    ((inits, inputs),) = seen
    assert not {"E", "E_quantized", "Pos", "Pos_quantized"} & inits and {"T", "Gm", "W"} <= inits
    assert {"E_quantized", "Pos_quantized"} <= inputs
    written = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).graph
    assert {"E_quantized", "Pos_quantized"} <= {t.name for t in written.initializer}
    assert [i.name for i in written.input] == ["ids", "pos", "pos2", "ids2"]
