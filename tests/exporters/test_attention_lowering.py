"""Attention lowering passes on tiny dynamo (opset 23) exports of BERT and Llama (GQA).

The model-export helpers here are also used by test_fusion_check.py.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters.attention_lowering import (
    AttentionLoweringError,
    find_attention_nodes,
    lower_to_block_sparse,
    lower_to_fused_attention,
    mask_attention_with_input,
)
from exporters.block_sparse_graph import (
    BlockSparsePattern,
    explicit_block_inputs,
    pattern_layout,
    reference_block_sparse,
)
from exporters.fusion_check import count_attention_nodes

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 100


def tiny_bert():
    import torch
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def tiny_llama():
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def export_dynamo(module, path: Path, *, with_mask: bool = True) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True, opset 23) with dynamic batch and seq."""
    import torch

    ids = torch.randint(0, VOCAB, (1, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    kwargs, shapes = {}, {"input_ids": {0: batch, 1: seq}}
    if with_mask:
        kwargs["attention_mask"] = torch.ones(1, 16, dtype=torch.long)
        shapes["attention_mask"] = {0: batch, 1: seq}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module, (ids,), kwargs=kwargs, dynamo=True, opset_version=23, dynamic_shapes=shapes, verbose=False
        )
    prog.save(str(path))
    return onnx.load(str(path))


def export_legacy(module, path: Path) -> onnx.ModelProto:
    """Legacy TorchScript export, opset 17: attention stays MatMul -> Softmax -> MatMul."""
    import torch

    ids = torch.randint(0, VOCAB, (1, 16))
    am = torch.ones(1, 16, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids, am),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        )
    return onnx.load(str(path))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """ORT CPU session with all graph optimisations off, so ORT's fusions cannot hide a bug."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    names = {i.name for i in model.graph.input}
    return session(model).run(None, {k: v for k, v in feeds.items() if k in names})[0]


# ----------------------------------------------------------------------------------------
# fixtures and oracle helpers
# ----------------------------------------------------------------------------------------

DENSE_ATOL = 1e-5  # same math, different kernel / layout: fp32 rounding only
SPARSE_ATOL = 1e-5  # block-sparse subgraph vs dense Attention with the equivalent bool mask


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory) -> onnx.ModelProto:
    return export_dynamo(tiny_bert(), tmp_path_factory.mktemp("bert") / "bert.onnx")


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory) -> onnx.ModelProto:
    return export_dynamo(tiny_llama(), tmp_path_factory.mktemp("llama") / "llama.onnx")


def _feeds(batch: int, seq: int, pad: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    am = np.ones((batch, seq), dtype=np.int64)
    if pad:
        am[-1, seq - pad :] = 0  # right padding in the last row
    return {"input_ids": rng.integers(0, VOCAB, (batch, seq)), "attention_mask": am}


def _with_dense_pattern_mask(model: onnx.ModelProto) -> onnx.ModelProto:
    """Oracle model: every Attention's mask is ANDed with a (S, S) bool input ``pattern_mask``.

    Dense attention restricted by the token-level block pattern is, by definition, what the
    block-sparse subgraph must compute; this reference uses ORT's dense Attention kernel.
    """
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    ref.graph.input.append(onnx.helper.make_tensor_value_info("pattern_mask", onnx.TensorProto.BOOL, ["s", "s"]))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(ref).graph.value_info}
    new_nodes, done = [], set()
    for node in ref.graph.node:
        if node in find_attention_nodes(ref):
            mask = node.input[3]
            if mask in done:  # layers sharing one mask tensor
                pass
            elif types[mask] == onnx.TensorProto.BOOL:
                new_nodes.append(onnx.helper.make_node("And", [mask, "pattern_mask"], [mask + "/pat"]))
            else:  # additive float mask: add -inf outside the pattern
                new_nodes.append(
                    onnx.helper.make_node(
                        "Constant", [], [mask + "/ninf"], value=onnx.helper.make_tensor("", 1, [], [-np.inf])
                    )
                )
                new_nodes.append(
                    onnx.helper.make_node(
                        "Constant", [], [mask + "/zero"], value=onnx.helper.make_tensor("", 1, [], [0.0])
                    )
                )
                new_nodes.append(
                    onnx.helper.make_node("Where", ["pattern_mask", mask + "/zero", mask + "/ninf"], [mask + "/padd"])
                )
                new_nodes.append(onnx.helper.make_node("Add", [mask, mask + "/padd"], [mask + "/pat"]))
            done.add(mask)
            node.input[3] = mask + "/pat"
        new_nodes.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(new_nodes)
    return ref


def _token_mask(pattern: BlockSparsePattern, seq: int) -> np.ndarray:
    blk = np.arange(seq) // pattern.block
    m = pattern_layout(pattern, seq)[blk[:, None], blk[None, :]]
    if pattern.is_causal:
        m &= np.tril(np.ones((seq, seq), dtype=bool))
    return m


# ----------------------------------------------------------------------------------------
# what the exporter emits
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_dynamo_export_emits_4d_attention(which: str, bert_onnx, llama_onnx) -> None:
    model = bert_onnx if which == "bert" else llama_onnx
    nodes = find_attention_nodes(model)
    assert len(nodes) == 2
    shapes = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    q = shapes[nodes[0].input[0]].type.tensor_type.shape
    assert len(q.dim) == 4 and q.dim[1].dim_value == 4  # (B, H, S, D), BNSH


# ----------------------------------------------------------------------------------------
# dense fused lowering
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["onnx_attention", "ms_mha"])
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_lower_to_fused_attention(op: str, which: str, bert_onnx, llama_onnx) -> None:
    model = bert_onnx if which == "bert" else llama_onnx
    lowered, count = lower_to_fused_attention(model, op=op)
    assert count == 2
    counts = count_attention_nodes(lowered)
    if op == "onnx_attention":
        assert counts["Attention"] == 2 and counts["com.microsoft.MultiHeadAttention"] == 0
    else:
        assert counts["Attention"] == 0 and counts["com.microsoft.MultiHeadAttention"] == 2
    assert counts["unfused_softmax_attention"] == 0
    onnx.checker.check_model(lowered, full_check=True)
    # Llama: batch 1 only (ORT's RotaryEmbedding rejects the exported batch-1 cos/sin cache for B > 1)
    feeds = _feeds(2 if which == "bert" else 1, 37, pad=9)
    np.testing.assert_allclose(run(lowered, feeds), run(model, feeds), atol=DENSE_ATOL, rtol=0)


def test_lower_to_fused_attention_rejects_model_without_attention(bert_onnx) -> None:
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2])],
        [onnx.helper.make_tensor_value_info("y", 1, [2])],
    )
    plain = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 23)])
    with pytest.raises(AttentionLoweringError, match="no opset-23 Attention"):
        lower_to_fused_attention(plain)
    with pytest.raises(AttentionLoweringError, match="no opset-23 Attention"):
        lower_to_block_sparse(plain, BlockSparsePattern("window", block=64, window_blocks=1))
    assert lower_to_fused_attention(plain, allow_noop=True)[1] == 0
    assert (
        lower_to_block_sparse(plain, BlockSparsePattern("window", block=64, window_blocks=1), allow_noop=True)[1] == 0
    )


def _tiny_attention_graph(*, rank: int, H: int, Hkv: int, D: int, causal: bool) -> onnx.ModelProto:
    """A single opset-23 Attention node, 3-D (q_num_heads/kv_num_heads) or 4-D."""
    fl = onnx.TensorProto.FLOAT
    if rank == 4:
        shapes = (["b", H, "s", D], ["b", Hkv, "s", D], ["b", H, "s", D])
        attrs = {}
    else:
        shapes = (["b", "s", H * D], ["b", "s", Hkv * D], ["b", "s", H * D])
        attrs = {"q_num_heads": H, "kv_num_heads": Hkv}
    node = onnx.helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=int(causal), **attrs)
    g = onnx.helper.make_graph(
        [node],
        "attn",
        [onnx.helper.make_tensor_value_info(n, fl, s) for n, s in zip("qkv", (shapes[0], shapes[1], shapes[1]))],
        [onnx.helper.make_tensor_value_info("y", fl, shapes[2])],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 23)])
    m.ir_version = 10
    return m


def test_ms_mha_rejects_gqa() -> None:
    model = _tiny_attention_graph(rank=4, H=4, Hkv=2, D=8, causal=True)
    with pytest.raises(AttentionLoweringError, match="GQA"):
        lower_to_fused_attention(model, op="ms_mha")


@pytest.mark.parametrize("rank", [3, 4])
def test_ms_mha_on_causal_node_without_mask(rank: int) -> None:
    model = _tiny_attention_graph(rank=rank, H=2, Hkv=2, D=8, causal=True)
    lowered, count = lower_to_fused_attention(model, op="ms_mha")
    assert count == 1 and count_attention_nodes(lowered)["com.microsoft.MultiHeadAttention"] == 1
    onnx.checker.check_model(lowered, full_check=True)
    rng = np.random.default_rng(0)
    shp = (2, 2, 45, 8) if rank == 4 else (2, 45, 16)
    feeds = {n: rng.standard_normal(shp).astype(np.float32) for n in "qkv"}
    np.testing.assert_allclose(run(lowered, feeds), run(model, feeds), atol=DENSE_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------
# block-sparse lowering
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "which, pattern, pad",
    [
        ("bert", BlockSparsePattern("window", block=64, window_blocks=1), 23),
        ("bert", BlockSparsePattern("global_window", block=64, window_blocks=1, global_blocks=1), 0),
        ("llama", BlockSparsePattern("causal_window", block=64, window_blocks=1), 23),
        ("llama", BlockSparsePattern("causal_window", block=32, window_blocks=1, global_blocks=1, query_group=3), 0),
    ],
)
def test_lower_to_block_sparse_matches_dense_masked(which, pattern, pad, bert_onnx, llama_onnx) -> None:
    model = bert_onnx if which == "bert" else llama_onnx
    lowered, count = lower_to_block_sparse(model, pattern)
    assert count == 2
    counts = count_attention_nodes(lowered)
    assert counts["block_sparse"] == 2 and counts["Attention"] == 0
    assert counts["unfused_softmax_attention"] == 0
    onnx.checker.check_model(lowered, full_check=True)
    seq = 333  # 5.2 blocks of 64: exercises the in-graph padding
    feeds = _feeds(2 if which == "bert" else 1, seq, pad)
    got = run(lowered, feeds)
    ref_model = _with_dense_pattern_mask(model)
    ref = run(ref_model, {**feeds, "pattern_mask": _token_mask(pattern, seq)})
    np.testing.assert_allclose(got, ref, atol=SPARSE_ATOL, rtol=0)
    # the pattern really changes the result (else the comparison above would be vacuous)
    assert np.abs(got - run(model, feeds)).max() > 1e-4


def test_block_sparse_key_padding_none_drops_dense_mask(llama_onnx) -> None:
    pattern = BlockSparsePattern("causal_window", block=64, window_blocks=1)
    kept, _ = lower_to_block_sparse(llama_onnx, pattern)
    dropped, count = lower_to_block_sparse(llama_onnx, pattern, key_padding="none")
    assert count == 2
    assert len(dropped.graph.node) < len(kept.graph.node)  # the dense (B,1,S,S) mask chain is dead code
    feeds = _feeds(1, 200, pad=0)
    np.testing.assert_allclose(run(dropped, feeds), run(kept, feeds), atol=SPARSE_ATOL, rtol=0)


@pytest.mark.parametrize("rank", [3, 4])
def test_block_sparse_on_hand_built_gqa_node(rank: int) -> None:
    """3-D (q_num_heads/kv_num_heads) and 4-D GQA nodes without a mask."""
    model = _tiny_attention_graph(rank=rank, H=4, Hkv=2, D=8, causal=True)
    pattern = BlockSparsePattern("causal_window", block=64, window_blocks=1)
    lowered, count = lower_to_block_sparse(model, pattern)
    assert count == 1
    onnx.checker.check_model(lowered, full_check=True)
    rng = np.random.default_rng(1)
    n = 200
    if rank == 4:
        q = rng.standard_normal((1, 4, n, 8)).astype(np.float32)
        k, v = (rng.standard_normal((1, 2, n, 8)).astype(np.float32) for _ in range(2))
        feeds = {"q": q, "k": k, "v": v}
    else:
        feeds = {
            "q": rng.standard_normal((1, n, 32)).astype(np.float32),
            "k": rng.standard_normal((1, n, 16)).astype(np.float32),
            "v": rng.standard_normal((1, n, 16)).astype(np.float32),
        }

    def bnsh(x, h):  # (1, n, h*8) -> (1, h, n, 8)
        return x.reshape(1, n, h, 8).transpose(0, 2, 1, 3) if rank == 3 else x

    ref = reference_block_sparse(
        bnsh(feeds["q"], 4), bnsh(feeds["k"], 2), bnsh(feeds["v"], 2), pattern_layout(pattern, n), block=64, causal=True
    )
    if rank == 3:
        ref = ref.transpose(0, 2, 1, 3).reshape(1, n, 32)
    np.testing.assert_allclose(run(lowered, feeds), ref, atol=SPARSE_ATOL, rtol=0)


@pytest.mark.parametrize("mask_shape, mask_type", [(("s", "s"), "bool"), (("b", 1, 1, "s"), "float")])
def test_ms_mha_mask_ranks_and_broadcast(mask_shape, mask_type) -> None:
    """Rank-2 bool (S, L) masks and additive masks broadcast along the query axis."""
    model = _tiny_attention_graph(rank=4, H=2, Hkv=2, D=8, causal=False)
    elem = onnx.TensorProto.BOOL if mask_type == "bool" else onnx.TensorProto.FLOAT
    model.graph.input.append(onnx.helper.make_tensor_value_info("m", elem, list(mask_shape)))
    model.graph.node[0].input.append("m")
    lowered, count = lower_to_fused_attention(model, op="ms_mha")
    assert count == 1
    onnx.checker.check_model(lowered, full_check=True)
    rng = np.random.default_rng(2)
    b, s = 2, 45
    feeds = {n: rng.standard_normal((b, 2, s, 8)).astype(np.float32) for n in "qkv"}
    if mask_type == "bool":
        feeds["m"] = np.tril(np.ones((s, s), dtype=bool))
    else:
        feeds["m"] = np.where(rng.random((b, 1, 1, s)) < 0.3, -1e9, 0.0).astype(np.float32)
    # ORT's own Attention rejects a mask broadcast along the query axis: feed the reference
    # the same mask expanded to (b, 1, s, s)
    ref_feeds = dict(feeds)
    if mask_type == "float":
        ref_feeds["m"] = np.ascontiguousarray(np.broadcast_to(feeds["m"], (b, 1, s, s)))
        model.graph.input[-1].CopyFrom(onnx.helper.make_tensor_value_info("m", elem, ["b", 1, "s", "s"]))
    np.testing.assert_allclose(run(lowered, feeds), run(model, ref_feeds), atol=DENSE_ATOL, rtol=0)


def test_block_sparse_explicit_pattern_adds_inputs() -> None:
    """explicit patterns: the lowered graph takes block_index / block_mask, shared by layers."""
    rng = np.random.default_rng(3)
    layout = rng.random((4, 4)) < 0.4
    np.fill_diagonal(layout, True)
    pattern = BlockSparsePattern("explicit", block=64, layout=layout, query_group=1)
    model = _tiny_attention_graph(rank=4, H=2, Hkv=2, D=8, causal=False)
    lowered, count = lower_to_block_sparse(model, pattern)
    assert count == 1
    assert {"block_index", "block_mask"} <= {i.name for i in lowered.graph.input}
    onnx.checker.check_model(lowered, full_check=True)
    n = 250
    feeds = {x: rng.standard_normal((1, 2, n, 8)).astype(np.float32) for x in "qkv"}
    got = run(lowered, {**feeds, **explicit_block_inputs(pattern, n)})
    ref = reference_block_sparse(feeds["q"], feeds["k"], feeds["v"], pattern_layout(pattern, n), block=64, causal=False)
    np.testing.assert_allclose(got, ref, atol=SPARSE_ATOL, rtol=0)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_mask_attention_with_input_matches_test_oracle(which: str, bert_onnx, llama_onnx) -> None:
    """The library's dense-masked baseline (used by the benchmarks) equals this file's oracle."""
    model = bert_onnx if which == "bert" else llama_onnx
    pattern = BlockSparsePattern("window", block=64, window_blocks=1)
    feeds = {**_feeds(1, 200, pad=11), "pattern_mask": _token_mask(pattern, 200)}
    lib = run(mask_attention_with_input(model), feeds)
    np.testing.assert_allclose(lib, run(_with_dense_pattern_mask(model), feeds), atol=DENSE_ATOL, rtol=0)
    feeds["pattern_mask"] = np.ones((200, 200), dtype=bool)  # an all-true pattern is a no-op
    np.testing.assert_allclose(run(mask_attention_with_input(model), feeds), run(model, feeds), atol=DENSE_ATOL, rtol=0)
