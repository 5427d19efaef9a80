"""Block-sparse ONNX attention subgraph vs the float64 oracle (odd n, causal, padding, GQA)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters.block_sparse_graph import (
    BLOCK_SPARSE_NODE_PREFIX,
    BlockSparsePattern,
    add_block_sparse_attention,
    block_sparse_attention_model,
    explicit_block_inputs,
    pattern_layout,
    reference_block_sparse,
)

ATOL = 1e-5  # fp32 softmax attention vs float64 oracle; measured max diffs are ~6e-7


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no ORT rewrite hides a bug
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qkv(rng, B, H, Hkv, n, D):
    q = rng.standard_normal((B, H, n, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, n, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, n, D)).astype(np.float32)
    return q, k, v


def _key_padding(B: int, n: int) -> np.ndarray:
    kpm = np.ones((B, n), dtype=bool)
    kpm[-1, n - 37 :] = False  # right padding in the last row, crossing a block edge
    kpm[0, :5] = False  # a few masked keys at the start of row 0
    return kpm


PATTERNS = {
    "window": BlockSparsePattern("window", block=64, window_blocks=1),
    "causal_window": BlockSparsePattern("causal_window", block=64, window_blocks=2),
    "causal_sink": BlockSparsePattern("causal_window", block=64, window_blocks=1, global_blocks=1),
    "global_window": BlockSparsePattern("global_window", block=64, window_blocks=1, global_blocks=1),
    "window_group1": BlockSparsePattern("window", block=64, window_blocks=1, query_group=1),
    "causal_group3": BlockSparsePattern("causal_window", block=32, window_blocks=2, query_group=3),
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("n", [200, 333])
@pytest.mark.parametrize("key_padding", [False, True])
def test_matches_float64_oracle(name: str, n: int, key_padding: bool) -> None:
    pat = PATTERNS[name]
    rng = np.random.default_rng(0)
    B, H, D = 2, 3, 16
    model = block_sparse_attention_model(pat, num_heads=H, head_dim=D, key_padding=key_padding)
    onnx.checker.check_model(model, full_check=True)
    q, k, v = _qkv(rng, B, H, H, n, D)
    feeds = {"q": q, "k": k, "v": v}
    kpm = _key_padding(B, n) if key_padding else None
    if key_padding:
        feeds["key_padding_mask"] = kpm
    out = _session(model).run(None, feeds)[0]
    ref = reference_block_sparse(
        q, k, v, pattern_layout(pat, n), block=pat.block, causal=pat.is_causal, key_padding=kpm
    )
    assert out.shape == (B, H, n, D)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["window", "causal_window", "global_window"])
def test_large_odd_n_single_batch(name: str) -> None:
    """n=1000 with block 64: 15.6 blocks, padding in the last superblock."""
    pat = PATTERNS[name]
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 2, 2, 1000, 32)
    model = block_sparse_attention_model(pat, num_heads=2, head_dim=32)
    out = _session(model).run(None, {"q": q, "k": k, "v": v})[0]
    ref = reference_block_sparse(q, k, v, pattern_layout(pat, 1000), block=64, causal=pat.is_causal)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("key_padding", [False, True])
@pytest.mark.parametrize("name", ["window", "causal_sink", "global_window"])
def test_gqa(name: str, key_padding: bool) -> None:
    pat = PATTERNS[name]
    rng = np.random.default_rng(2)
    B, H, Hkv, n, D = 2, 6, 2, 333, 16
    model = block_sparse_attention_model(pat, num_heads=H, num_kv_heads=Hkv, head_dim=D, key_padding=key_padding)
    onnx.checker.check_model(model, full_check=True)
    q, k, v = _qkv(rng, B, H, Hkv, n, D)
    feeds = {"q": q, "k": k, "v": v}
    kpm = _key_padding(B, n) if key_padding else None
    if key_padding:
        feeds["key_padding_mask"] = kpm
    out = _session(model).run(None, feeds)[0]
    ref = reference_block_sparse(q, k, v, pattern_layout(pat, n), block=64, causal=pat.is_causal, key_padding=kpm)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_one_model_serves_every_n() -> None:
    """Index and mask are computed in-graph, so the same session runs any n."""
    pat = PATTERNS["causal_sink"]
    model = block_sparse_attention_model(pat, num_heads=2, head_dim=8)
    sess = _session(model)
    rng = np.random.default_rng(3)
    for n in (1, 63, 64, 65, 129, 300):
        q, k, v = _qkv(rng, 1, 2, 2, n, 8)
        out = sess.run(None, {"q": q, "k": k, "v": v})[0]
        ref = reference_block_sparse(q, k, v, pattern_layout(pat, n), block=64, causal=True)
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0, err_msg=f"n={n}")


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_layout_fed_as_inputs(causal: bool) -> None:
    rng = np.random.default_rng(4)
    nb = 6
    layout = rng.random((nb, nb)) < 0.35
    np.fill_diagonal(layout, True)
    pat = BlockSparsePattern("explicit", block=64, layout=layout, causal=causal)
    model = block_sparse_attention_model(pat, num_heads=4, num_kv_heads=2, head_dim=16, key_padding=True)
    onnx.checker.check_model(model, full_check=True)
    sess = _session(model)
    for n in (333, 384):
        q, k, v = _qkv(rng, 2, 4, 2, n, 16)
        kpm = _key_padding(2, n)
        feeds = {"q": q, "k": k, "v": v, "key_padding_mask": kpm, **explicit_block_inputs(pat, n)}
        out = sess.run(None, feeds)[0]
        ref = reference_block_sparse(q, k, v, pattern_layout(pat, n), block=64, causal=causal, key_padding=kpm)
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0, err_msg=f"n={n}")


def test_pattern_is_not_dense() -> None:
    """Guard against a vacuous oracle: sparse output must differ from full attention."""
    pat = PATTERNS["window"]
    rng = np.random.default_rng(5)
    n = 333
    q, k, v = _qkv(rng, 1, 2, 2, n, 16)
    out = _session(block_sparse_attention_model(pat, num_heads=2, head_dim=16)).run(None, {"q": q, "k": k, "v": v})[0]
    full = reference_block_sparse(q, k, v, np.ones((6, 6), bool), block=64, causal=False)
    assert np.abs(out - full).max() > 1e-2


def test_core_attends_only_gathered_blocks() -> None:
    """The core Attention sees L = KB*b keys per superblock, not n: only kept blocks are computed."""
    pat = BlockSparsePattern("window", block=64, window_blocks=1)  # KB = query_group + 2w = 4
    model = block_sparse_attention_model(pat, num_heads=2, head_dim=8)
    core = next(nd for nd in model.graph.node if nd.name == f"{BLOCK_SPARSE_NODE_PREFIX}0/core")
    assert core.op_type == "Attention"
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(core.input[1]))  # expose gathered K
    rng = np.random.default_rng(6)
    n = 1000
    q, k, v = _qkv(rng, 1, 2, 2, n, 8)
    k_gathered = _session(model).run([core.input[1]], {"q": q, "k": k, "v": v})[0]
    nr = math.ceil(n / 128)
    assert k_gathered.shape == (2, nr, 4 * 64, 8)  # (B*H, nr, L, D), L = 256 << n


def test_add_to_existing_graph() -> None:
    """The builder appends into a larger graph: two subgraphs with distinct prefixes."""
    pat = PATTERNS["causal_window"]
    fl = onnx.TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = []
    add_block_sparse_attention(nodes, "q", "k", "v", pat, output="a", num_heads=2, head_dim=8, index=0)
    add_block_sparse_attention(nodes, "a", "k", "v", pat, output="out", num_heads=2, head_dim=8, index=1)
    io = [onnx.helper.make_tensor_value_info(x, fl, ["b", 2, "n", 8]) for x in ("q", "k", "v")]
    g = onnx.helper.make_graph(nodes, "two", io, [onnx.helper.make_tensor_value_info("out", fl, ["b", 2, "n", 8])])
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 1, 2, 2, 150, 8)
    out = _session(model).run(None, {"q": q, "k": k, "v": v})[0]
    lay = pattern_layout(pat, 150)
    a = reference_block_sparse(q, k, v, lay, block=64, causal=True)
    ref = reference_block_sparse(a, k, v, lay, block=64, causal=True)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_oracle_fully_masked_rows_are_zero() -> None:
    q = np.ones((1, 1, 4, 2))
    kpm = np.array([[False, False, True, True]])
    out = reference_block_sparse(q, q, q, np.ones((1, 1), bool), block=4, causal=True, key_padding=kpm)
    assert np.all(out[0, 0, :2] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="band", block=64),
        dict(kind="window", block=0),
        dict(kind="window", block=64, window_blocks=-1),
        dict(kind="window", block=64, global_blocks=1),
        dict(kind="global_window", block=64, window_blocks=1),
        dict(kind="explicit", block=64),
        dict(kind="window", block=64, causal=True),
    ],
)
def test_pattern_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BlockSparsePattern(**kwargs)
