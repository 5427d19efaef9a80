"""Check that every attention layer of an ONNX model is a fused op (or a block-sparse subgraph).

Counted forms (keys of :func:`count_attention_nodes`):

* ``"Attention"``: the standard opset-23 ``Attention`` op (outside block-sparse subgraphs).
* ``"com.microsoft.MultiHeadAttention"``, ``"com.microsoft.Attention"``,
  ``"com.microsoft.GroupQueryAttention"``: ORT contrib fused ops.
* ``"block_sparse"``: subgraphs built by :mod:`exporters.block_sparse_graph`, identified by
  the node-name prefix ``block_sparse_attention/<k>/`` (one per distinct ``k``).
* ``"unfused_softmax_attention"``: a ``Softmax`` whose input comes (through elementwise
  scaling/masking ops) from a ``MatMul`` of two activations, and whose output (through
  Cast/Dropout/Where) feeds a ``MatMul``, i.e. attention left as MatMul -> Softmax -> MatMul.
  A MatMul with a constant (weight) operand is a projection, not attention scores.

Only the main graph is inspected (not If/Loop bodies or local functions).
"""

from __future__ import annotations

import logging

import onnx

from exporters.block_sparse_graph import BLOCK_SPARSE_NODE_PREFIX
from exporters.graph import GraphIndex

logger = logging.getLogger(__name__)

__all__ = ["AttentionNotFused", "assert_attention_fused", "count_attention_nodes", "find_unfused_attention"]

FUSED_KEYS = (
    "Attention",
    "com.microsoft.MultiHeadAttention",
    "com.microsoft.Attention",
    "com.microsoft.GroupQueryAttention",
    "block_sparse",
)

# Ops allowed between the score MatMul and the Softmax (scale, bias, mask, casts).
_SCORE_PASSTHROUGH = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Where",
    "Cast",
    "Reshape",
    "Identity",
    "Transpose",
    "Clip",
    "Tanh",
    "Max",
    "Min",
}
# Ops allowed between the Softmax and the P @ V MatMul.
_PROB_PASSTHROUGH = {"Cast", "Dropout", "Where", "Identity", "Reshape", "Mul"}
_MATMULS = {"MatMul", "FusedMatMul", "Einsum"}
_MAX_DEPTH = 6


class AttentionNotFused(ValueError):
    """Raised when attention is left unfused or the fused count differs from the expectation.

    Attributes:
        counts: the :func:`count_attention_nodes` dict.
        unfused_nodes: names of the Softmax nodes of unfused attention.
    """

    def __init__(self, message: str, counts: dict[str, int], unfused_nodes: list[str]) -> None:
        super().__init__(message)
        self.counts = counts
        self.unfused_nodes = unfused_nodes


def _block_sparse_id(node_name: str) -> str | None:
    if not node_name.startswith(BLOCK_SPARSE_NODE_PREFIX):
        return None
    return node_name[len(BLOCK_SPARSE_NODE_PREFIX) :].split("/", 1)[0]


def _scores_from_activation_matmul(idx: GraphIndex, name: str, depth: int = 0) -> bool:
    node = idx.producer.get(name)
    if node is None or depth > _MAX_DEPTH:
        return False
    if node.op_type in _MATMULS:
        ins = [i for i in node.input if i]
        return len(ins) >= 2 and not any(idx.is_constant(i) for i in ins[:2])
    if node.op_type in _SCORE_PASSTHROUGH:
        return any(
            _scores_from_activation_matmul(idx, i, depth + 1) for i in node.input if i and not idx.is_constant(i)
        )
    return False


def _feeds_matmul(idx: GraphIndex, name: str, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    for node in idx.consumers.get(name, []):
        if node.op_type in _MATMULS:
            return True
        if node.op_type in _PROB_PASSTHROUGH and any(_feeds_matmul(idx, o, depth + 1) for o in node.output):
            return True
    return False


def find_unfused_attention(model: onnx.ModelProto) -> list[str]:
    """Names of Softmax nodes that sit in an unfused MatMul -> Softmax -> MatMul attention.

    Args:
        model: the ONNX model.
    """
    idx = GraphIndex(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "Softmax" or not node.input:
            continue
        if _scores_from_activation_matmul(idx, node.input[0]) and _feeds_matmul(idx, node.output[0]):
            found.append(node.name or node.output[0])
    return found


def count_attention_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Count attention layers by form.

    Args:
        model: the ONNX model.

    Returns:
        dict with keys ``"Attention"``, ``"com.microsoft.MultiHeadAttention"``,
        ``"com.microsoft.Attention"``, ``"com.microsoft.GroupQueryAttention"``,
        ``"block_sparse"`` and ``"unfused_softmax_attention"``.
    """
    counts = {key: 0 for key in FUSED_KEYS}
    sparse_ids: set[str] = set()
    for node in model.graph.node:
        sid = _block_sparse_id(node.name)
        if sid is not None:
            sparse_ids.add(sid)
            continue  # the Attention core inside a block-sparse subgraph is not a dense layer
        domain = node.domain or ""
        if domain in ("", "ai.onnx") and node.op_type == "Attention":
            counts["Attention"] += 1
        elif domain == "com.microsoft":
            key = f"com.microsoft.{node.op_type}"
            if key in counts:
                counts[key] += 1
    counts["block_sparse"] = len(sparse_ids)
    counts["unfused_softmax_attention"] = len(find_unfused_attention(model))
    return counts


def assert_attention_fused(model: onnx.ModelProto, expected_layers: int) -> dict[str, int]:
    """Raise :class:`AttentionNotFused` unless exactly ``expected_layers`` fused attention
    layers are present and none is left as MatMul -> Softmax -> MatMul.

    Args:
        model: the ONNX model.
        expected_layers: number of attention layers the model should contain.

    Returns:
        The :func:`count_attention_nodes` dict.
    """
    if expected_layers < 0:
        raise ValueError(f"expected_layers must be >= 0, got {expected_layers}")
    counts = count_attention_nodes(model)
    unfused = find_unfused_attention(model) if counts["unfused_softmax_attention"] else []
    fused = sum(counts[k] for k in FUSED_KEYS)
    problems = []
    if unfused:
        problems.append(f"{len(unfused)} unfused MatMul->Softmax->MatMul attention(s) at Softmax nodes {unfused}")
    if fused != expected_layers:
        problems.append(f"found {fused} fused attention layer(s), expected {expected_layers}")
    if problems:
        found = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise AttentionNotFused("; ".join(problems) + f" (found: {found})", counts, unfused)
    logger.debug("attention fused: %s", counts)
    return counts
