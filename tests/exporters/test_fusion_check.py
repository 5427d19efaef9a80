"""Fusion check: fused ops counted, legacy MatMul->Softmax->MatMul attention detected."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.attention_lowering import lower_to_block_sparse, lower_to_fused_attention
from exporters.block_sparse_graph import BlockSparsePattern
from exporters.fusion_check import AttentionNotFused, assert_attention_fused, count_attention_nodes
from tests.exporters.test_attention_lowering import export_dynamo, export_legacy, tiny_bert


@pytest.fixture(scope="module")
def bert_models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    d = tmp_path_factory.mktemp("fusion")
    module = tiny_bert()
    return {"legacy": export_legacy(module, d / "legacy.onnx"), "dynamo": export_dynamo(module, d / "dynamo.onnx")}


def test_legacy_export_is_unfused(bert_models) -> None:
    counts = count_attention_nodes(bert_models["legacy"])
    assert counts["unfused_softmax_attention"] == 2  # one per layer
    assert counts["Attention"] == counts["com.microsoft.MultiHeadAttention"] == counts["block_sparse"] == 0
    with pytest.raises(AttentionNotFused, match="2 unfused") as err:
        assert_attention_fused(bert_models["legacy"], expected_layers=2)
    assert len(err.value.unfused_nodes) == 2
    assert err.value.counts["unfused_softmax_attention"] == 2


def test_dynamo_opset23_is_fused(bert_models) -> None:
    counts = assert_attention_fused(bert_models["dynamo"], expected_layers=2)
    assert counts["Attention"] == 2 and counts["unfused_softmax_attention"] == 0
    with pytest.raises(AttentionNotFused, match="found 2 fused attention layer\\(s\\), expected 3"):
        assert_attention_fused(bert_models["dynamo"], expected_layers=3)


def test_lowered_models_are_fused(bert_models) -> None:
    mha, _ = lower_to_fused_attention(bert_models["dynamo"], op="ms_mha")
    assert assert_attention_fused(mha, 2)["com.microsoft.MultiHeadAttention"] == 2
    sparse, _ = lower_to_block_sparse(bert_models["dynamo"], BlockSparsePattern("window", block=64, window_blocks=1))
    counts = assert_attention_fused(sparse, 2)
    assert counts["block_sparse"] == 2 and counts["Attention"] == 0  # cores inside subgraphs are not dense layers


def _graph(nodes, inputs, inits=()) -> onnx.ModelProto:
    fl = TensorProto.FLOAT
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, fl, None) for n in inputs],
        [helper.make_tensor_value_info("y", fl, None)],
        initializer=list(inits),
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_softmax_over_weight_matmul_is_not_attention() -> None:
    """A classifier head (x @ W -> Softmax -> @ W2) has constant operands: not attention."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    w2 = numpy_helper.from_array(np.ones((4, 4), np.float32), "w2")
    wt = helper.make_node("Transpose", ["w"], ["wt"])  # constant-derived: still a weight
    nodes = [
        wt,
        helper.make_node("MatMul", ["x", "wt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"]),
        helper.make_node("MatMul", ["p", "w2"], ["y"]),
    ]
    assert count_attention_nodes(_graph(nodes, ["x"], [w, w2]))["unfused_softmax_attention"] == 0


def test_handwritten_unfused_attention_with_scale_and_mask() -> None:
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Div", ["s", "c"], ["s2"]),
        helper.make_node("Add", ["s2", "mask"], ["s3"]),
        helper.make_node("Softmax", ["s3"], ["p"], axis=-1, name="sm"),
        helper.make_node("Cast", ["p"], ["p2"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["p2", "v"], ["y"]),
    ]
    c = numpy_helper.from_array(np.array(2.0, np.float32), "c")
    model = _graph(nodes, ["q", "k", "v", "mask"], [c])
    with pytest.raises(AttentionNotFused) as err:
        assert_attention_fused(model, expected_layers=1)
    assert err.value.unfused_nodes == ["sm"]
    # a softmax whose output is not multiplied with values is not attention
    nodes[-1] = helper.make_node("Identity", ["p2"], ["y"])
    assert count_attention_nodes(_graph(nodes, ["q", "k", "v", "mask"], [c]))["unfused_softmax_attention"] == 0
