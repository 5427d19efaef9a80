"""Tests for exporters.onnx: dynamic axes, ORT-vs-PyTorch parity, KV cache, determinism, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.onnx import (
    PARITY_ATOL,
    ExportError,
    ExportResult,
    dummy_feeds,
    export_onnx,
    torch_reference,
)
from pipeline.models import LoadedModel, default_model_path, load_model
from tests.helpers import make_tiny_model, read_passages

FAMILIES = ("bert", "gpt2", "llama")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


class _Lazy(dict):
    """Builds an entry on first access, so ``-k`` runs only pay for the families they use."""

    def __init__(self, make) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self._make = make

    def __missing__(self, key: str):  # type: ignore[no-untyped-def]
        self[key] = value = self._make(key)
        return value

    def values(self):  # type: ignore[no-untyped-def]
        return [self[f] for f in FAMILIES]


@pytest.fixture(scope="module")
def loaded(root: Path) -> dict[str, LoadedModel]:
    # initializer_range 0.2: wider logits than the 0.02 default, so argmax/parity checks are not on near-ties
    return _Lazy(lambda f: load_model(make_tiny_model(root / "models", f, initializer_range=0.2)))


@pytest.fixture(scope="module")
def exported(root: Path, loaded: dict[str, LoadedModel]) -> dict[str, ExportResult]:
    return _Lazy(lambda f: export_onnx(loaded[f], root / "onnx" / f))


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    # No graph rewrites: parity is about the exported graph, not ORT's fusions.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, result: ExportResult, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip(result.output_names, sess.run(list(result.output_names), feeds)))


def _assert_parity(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], atol: float = PARITY_ATOL) -> None:
    """Names, then shapes, then values; all failures collected into one message."""
    assert set(got) == set(ref), f"output names differ: {sorted(got)} vs {sorted(ref)}"
    bad = []
    for name in ref:
        if got[name].shape != ref[name].shape:
            bad.append(f"{name}: shape {got[name].shape} != {ref[name].shape}")
            continue
        err = float(np.max(np.abs(got[name] - ref[name])))
        if not err <= atol:
            bad.append(f"{name}: max abs diff {err:.3g} > {atol}")
    assert not bad, "; ".join(bad)


# ---------------------------------------------------------------- IO and dynamic axes


def test_io_names(exported: dict[str, ExportResult]) -> None:
    bert, gpt2, llama = (exported[f] for f in FAMILIES)
    assert bert.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert bert.output_names == ("last_hidden_state",)
    assert not bert.with_past and (bert.num_layers, bert.num_kv_heads, bert.head_dim) == (0, 0, 0)
    for r, kv in ((gpt2, 4), (llama, 2)):  # llama: GQA, 2 KV heads for 4 query heads
        assert r.with_past and r.task == "text-generation"
        assert r.input_names[:3] == ("input_ids", "attention_mask", "position_ids")
        assert r.past_names == tuple(f"past_key_values.{i}.{t}" for i in range(2) for t in ("key", "value"))
        assert r.output_names == ("logits",) + tuple(f"present.{i}.{t}" for i in range(2) for t in ("key", "value"))
        assert (r.num_layers, r.num_kv_heads, r.head_dim) == (2, kv, 8)
    for r in exported.values():
        assert (r.exporter, r.opset) == ("dynamo", 18)
        assert r.path.name == "model.onnx" and r.path.is_file()
        assert sorted(p.name for p in r.path.parent.iterdir()) == ["model.onnx"]  # no temp leftovers


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_axes_declared(exported: dict[str, ExportResult], family: str) -> None:
    """Every input and output has symbolic batch and sequence axes (no baked trace sizes)."""
    graph = onnx.load(str(exported[family].path), load_external_data=False).graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        seq_axis = 2 if "past_key_values" in value.name or "present" in value.name else 1
        assert dims[0].dim_param, f"{value.name}: batch axis is fixed ({dims[0].dim_value})"
        assert dims[seq_axis].dim_param, f"{value.name}: sequence axis is fixed ({dims[seq_axis].dim_value})"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("batch", "seq"), [(1, 7), (3, 13)])
def test_parity_two_shapes(
    loaded: dict[str, LoadedModel], exported: dict[str, ExportResult], family: str, batch: int, seq: int
) -> None:
    """ORT matches the PyTorch reference on shapes other than the traced (2, 5); decoders with empty past."""
    result = exported[family]
    feeds = dummy_feeds(result, batch, seq, seed=batch)
    if family == "bert":  # exercise padding and the second segment
        feeds["attention_mask"][-1, seq // 2 :] = 0
        feeds["token_type_ids"][:, seq // 2 :] = 1
    got = _run(_session(result.path), result, feeds)
    ref = torch_reference(loaded[family], feeds)
    _assert_parity(got, ref)
    assert got[result.output_names[0]].shape[:2] == (batch, seq)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parity_with_past(loaded: dict[str, LoadedModel], exported: dict[str, ExportResult], family: str) -> None:
    result = exported[family]
    feeds = dummy_feeds(result, batch=3, seq=1, past=6, seed=1)
    got = _run(_session(result.path), result, feeds)
    _assert_parity(got, torch_reference(loaded[family], feeds))
    assert got["present.1.value"].shape == (3, result.num_kv_heads, 7, result.head_dim)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_steps_match_no_cache(
    loaded: dict[str, LoadedModel], exported: dict[str, ExportResult], family: str
) -> None:
    """Prefill 5 tokens with empty past, then 4 single-token steps: each step's logits equal
    the full-sequence (no cache) PyTorch logits at that position; left padding in row 1."""
    result, model = exported[family], loaded[family].model
    sess = _session(result.path)
    rng = np.random.default_rng(7)
    batch, prompt, steps = 2, 5, 4
    ids = rng.integers(3, result.vocab_size, size=(batch, prompt + steps), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded by two tokens
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.inference_mode():
        full = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
            use_cache=False,
        ).logits.numpy()  # (B, prompt + steps, V)

    past = {n: np.zeros((batch, result.num_kv_heads, 0, result.head_dim), np.float32) for n in result.past_names}
    start = 0
    for length in [prompt] + [1] * steps:
        end = start + length
        feeds = {
            "input_ids": ids[:, start:end],
            "attention_mask": mask[:, :end],
            "position_ids": pos[:, start:end],
            **past,
        }
        out = _run(sess, result, feeds)
        # padded query positions attend to nothing real; their logits are arbitrary, so compare real tokens only
        real = mask[:, start:end].astype(bool)  # (B, length)
        err = np.abs(out["logits"] - full[:, start:end])[real].max()
        assert err <= PARITY_ATOL, f"tokens {start}:{end}: cached logits differ from no-cache by {err:.3g}"
        past = {n: out[n.replace("past_key_values.", "present.")] for n in result.past_names}
        assert past[result.past_names[0]].shape[2] == end
        start = end


def test_decoder_without_past(root: Path, loaded: dict[str, LoadedModel]) -> None:
    result = export_onnx(loaded["gpt2"], root / "onnx" / "gpt2-nopast", with_past=False)
    assert not result.with_past
    assert result.input_names == ("input_ids", "attention_mask", "position_ids")
    assert result.output_names == ("logits",)
    feeds = dummy_feeds(result, 2, 9, seed=3)
    _assert_parity(_run(_session(result.path), result, feeds), torch_reference(loaded["gpt2"], feeds))


def test_fill_mask_export(root: Path) -> None:
    """Masked-LM head, and no tokenizer: token_type_ids come from the config's type_vocab_size."""
    path = make_tiny_model(root / "models-mlm", "bert", with_tokenizer=False, architectures=["BertForMaskedLM"])
    lm = load_model(path)
    assert lm.tokenizer is None
    result = export_onnx(lm, root / "onnx" / "mlm")
    assert (result.task, result.output_names) == ("fill-mask", ("logits",))
    assert result.input_names == ("input_ids", "attention_mask", "token_type_ids")
    feeds = dummy_feeds(result, 2, 6)
    got = _run(_session(result.path), result, feeds)
    assert got["logits"].shape == (2, 6, lm.model.config.vocab_size)
    _assert_parity(got, torch_reference(lm, feeds))


def test_decoder_body_feature_extraction(root: Path, loaded: dict[str, LoadedModel]) -> None:
    """A decoder loaded for feature-extraction exports its hidden states, without cache IO."""
    lm = load_model(loaded["gpt2"].path, task="feature-extraction")
    result = export_onnx(lm, root / "onnx" / "gpt2-features")
    assert (result.input_names, result.output_names) == (("input_ids", "attention_mask"), ("last_hidden_state",))
    assert not result.with_past and result.num_layers == 0
    feeds = dummy_feeds(result, 3, 4)
    got = _run(_session(result.path), result, feeds)
    assert got["last_hidden_state"].shape == (3, 4, lm.model.config.n_embd)
    _assert_parity(got, torch_reference(lm, feeds))


# ---------------------------------------------------------------- optimum cross-check


def test_optimum_matches_dynamo(root: Path, loaded: dict[str, LoadedModel], exported: dict[str, ExportResult]) -> None:
    dyn = exported["gpt2"]
    opt = export_onnx(loaded["gpt2"], root / "onnx" / "gpt2-optimum", exporter="optimum")
    assert opt.exporter == "optimum" and opt.with_past
    assert set(opt.input_names) == set(dyn.input_names)  # same names, optimum orders them differently
    assert opt.output_names == dyn.output_names
    s_dyn, s_opt = _session(dyn.path), _session(opt.path)
    for batch, seq, past in [(1, 6, 0), (2, 1, 5)]:
        feeds = dummy_feeds(dyn, batch, seq, past, seed=past)
        a = _run(s_dyn, dyn, feeds)
        b = _run(s_opt, opt, {n: feeds[n] for n in opt.input_names})
        _assert_parity(b, a)
        _assert_parity(b, torch_reference(loaded["gpt2"], feeds))


# ---------------------------------------------------------------- determinism, atomicity, errors


def test_reexport_is_byte_identical(
    root: Path, loaded: dict[str, LoadedModel], exported: dict[str, ExportResult]
) -> None:
    """A second export in the same process (where the raw dynamo output differs) gives the same bytes."""
    again = export_onnx(loaded["gpt2"], root / "onnx" / "gpt2-again")
    assert again.path.read_bytes() == exported["gpt2"].path.read_bytes()
    model = onnx.load(str(again.path))
    assert not model.metadata_props and not model.producer_version
    assert all(not n.metadata_props for n in model.graph.node)


def test_export_error_is_one_line_and_atomic(root: Path, tmp_path: Path) -> None:
    """A failing export raises ExportError naming model type and exporter, and leaves the old file alone."""
    src = make_tiny_model(tmp_path / "m", "gpt2")
    lm = load_model(src)
    shutil.rmtree(src)  # optimum re-reads weights from disk: now it must fail
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous")
    with pytest.raises(ExportError, match=r"^gpt2: optimum export failed: ") as exc:
        export_onnx(lm, out, exporter="optimum")
    assert "\n" not in str(exc.value)
    assert exc.value.__cause__ is not None
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"previous"


def test_bad_arguments(root: Path, loaded: dict[str, LoadedModel], exported: dict[str, ExportResult]) -> None:
    with pytest.raises(ValueError, match="'tflite'"):
        export_onnx(loaded["bert"], root / "x", exporter="tflite")
    with pytest.raises(ValueError, match="with_past=True needs a text-generation decoder"):
        export_onnx(loaded["bert"], root / "x", with_past=True)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(loaded["bert"], root / "x", opset=9)
    with pytest.raises(ValueError, match="no KV cache"):
        dummy_feeds(exported["bert"], 1, 4, past=2)


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_export_parity_on_real_sentences(tmp_path: Path) -> None:
    lm = load_model(default_model_path())
    result = export_onnx(lm, tmp_path)
    assert result.input_names == ("input_ids", "attention_mask", "token_type_ids")
    sess = _session(result.path)
    assert lm.tokenizer is not None
    for offset, n in ((0, 4), (100, 3)):  # two batches: different batch sizes and padded lengths
        enc = lm.tokenizer(read_passages(n, offset), padding=True, truncation=True, max_length=64, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in result.input_names}
        got = _run(sess, result, feeds)
        ref = torch_reference(lm, feeds)
        _assert_parity(got, ref)
        # mean-pooled sentence embeddings agree too (the product's actual output)
        m = feeds["attention_mask"][..., None]
        pool = lambda h, m=m: (h * m).sum(1) / m.sum(1)  # noqa: E731
        cos = (pool(got["last_hidden_state"]) * pool(ref["last_hidden_state"])).sum(-1) / (
            np.linalg.norm(pool(got["last_hidden_state"]), axis=-1)
            * np.linalg.norm(pool(ref["last_hidden_state"]), axis=-1)
        )
        assert cos.min() > 0.99999


def _dynamo_gelu_graph(width: int, swapped: bool = False) -> onnx.ModelProto:
    """x * ((1 + erf(x / sqrt 2)) * 0.5): exact GELU in the order torch's dynamo exporter writes it
    (``swapped``: every commutative operand pair the other way round)."""
    from onnx import TensorProto, helper, numpy_helper

    c = {
        n: numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5))
    }
    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["one", "e"] if swapped else ["e", "one"], ["a"]),
        helper.make_node("Mul", ["a", "half"] if swapped else ["half", "a"], ["h"]),
        helper.make_node("Mul", ["h", "x"] if swapped else ["x", "h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", width])],
        list(c.values()),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("swapped", [False, True])
def test_gelu_is_reordered_so_ort_fuses_it(tmp_path: Path, swapped: bool) -> None:
    """Issue 11 item 7: the dynamo GELU tail ran as 5 kernels per FFN per inference; reordered, ORT fuses one Gelu."""
    from math import erf

    from onnxscript import ir

    from exporters.onnx import _gelu_in_fusable_order

    def fused_ops(model: onnx.ModelProto) -> list[str]:
        src, opt = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return sorted(n.op_type for n in onnx.load(str(opt)).graph.node)

    model = _dynamo_gelu_graph(37, swapped)
    assert "Gelu" not in fused_ops(model)
    graph = ir.from_proto(model)
    assert _gelu_in_fusable_order(graph) == 1
    assert _gelu_in_fusable_order(graph) == 0  # already in fusable order: nothing left to match
    model = ir.to_proto(graph)
    assert fused_ops(model) == ["Gelu"]
    x = np.random.default_rng(0).standard_normal((3, 37)).astype(np.float32) * 4
    onnx.save(model, str(tmp_path / "r.onnx"))
    got = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    oracle = np.array([[0.5 * v * (1 + erf(v / 2**0.5)) for v in row] for row in x.astype(np.float64)])  # float64 GELU
    assert np.abs(got - oracle).max() < 1e-5


def test_exported_bert_ffn_gelu_fuses(exported: dict[str, ExportResult], tmp_path: Path) -> None:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(exported["bert"].path), so, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert "Erf" not in ops and ops & {"Gelu", "BiasGelu", "FastGelu"}


def test_external_data_export_streams_the_weights_and_matches_the_single_file(
    loaded: dict[str, LoadedModel], exported: dict[str, ExportResult], tmp_path: Path
) -> None:
    """Issue 11 item 2: over the threshold the weights go straight from the exporter to model.onnx.data (no
    in-memory ModelProto with a copy of them); the graph and the outputs are those of the one-file export."""
    from exporters.onnx import data_file

    res = export_onnx(loaded["bert"], tmp_path / "ext", external_data_threshold=0)
    single = onnx.load(str(exported["bert"].path))
    graph = onnx.load(str(res.path), load_external_data=False)
    big = [t for t in graph.graph.initializer if np.prod(t.dims) * 4 > 1024]  # fp32 tensors over 1 KiB
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    weights = sum(int(np.prod(t.dims)) * 4 for t in big)
    assert data_file(res.path).stat().st_size >= weights > 16 * 1024
    assert res.path.stat().st_size < exported["bert"].path.stat().st_size - weights + 4096  # no weight data in it
    assert [(n.op_type, list(n.input), list(n.output)) for n in graph.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in single.graph.node
    ]
    feeds = dummy_feeds(res, 2, 7)
    got = _run(_session(res.path), res, feeds)
    ref = _run(_session(exported["bert"].path), exported["bert"], feeds)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
