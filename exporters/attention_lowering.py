"""Lowering passes for the attention of exported ONNX models.

``torch.onnx.export(dynamo=True, opset_version=23)`` emits SDPA as the standard opset-23
``Attention`` op.  What transformers 4.57.6 + torch 2.13 emit (checked by exporting tiny
BERT / Llama models built from configs with ``attn_implementation="sdpa"``):

* 4-D BNSH inputs: Q (B, H, S, D), K/V (B, H, L, D).  Llama's GQA is already expanded
  (``repeat_kv``) before the op, so K/V carry H heads.
* ``is_causal=0`` with an explicit mask (B, 1, S, L): float additive (BERT, ``masked_fill``
  with the float32 minimum) or bool (Llama, causal AND padding).  ``scale`` is set for Llama.
* No past_key/past_value without a KV cache.

3-D inputs (``q_num_heads``/``kv_num_heads``) are also accepted by both passes.

Passes (both return ``(model, count)``; a zero count raises unless ``allow_noop=True``):

* :func:`lower_to_fused_attention` with ``op="onnx_attention"`` confirms the opset-23 ops;
  with ``op="ms_mha"`` it rewrites them into com.microsoft ``MultiHeadAttention``.
* :func:`lower_to_block_sparse` replaces each ``Attention`` with the block-sparse subgraph
  of :mod:`exporters.block_sparse_graph`, which computes only the kept blocks.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.block_sparse_graph import (
    BLOCK_SPARSE_NODE_PREFIX,
    BlockSparsePattern,
    add_block_sparse_attention,
)
from exporters.graph import NodeBuilder

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionLoweringError",
    "find_attention_nodes",
    "lower_to_block_sparse",
    "lower_to_fused_attention",
    "mask_attention_with_input",
]

_INT64_MAX = np.iinfo(np.int64).max
#: Additive-mask entries at or below this are treated as "masked" when deriving key padding
#: from a float mask (HF uses the float32 minimum, some exports use -1e4).
FLOAT_MASK_THRESHOLD = -1.0e4


class AttentionLoweringError(ValueError):
    """An attention lowering pass matched nothing or met an unsupported Attention node."""


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _copy_with_attention_nodes(
    model: onnx.ModelProto, allow_noop: bool
) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    """A copy of ``model`` for a pass to rewrite and its Attention nodes (:func:`find_attention_nodes`).

    Raises:
        AttentionLoweringError: no Attention node and not ``allow_noop`` (then the list is empty).
    """
    out = copy.deepcopy(model)
    nodes = find_attention_nodes(out)
    if not nodes and not allow_noop:
        raise AttentionLoweringError("no opset-23 Attention node found; export with dynamo=True, opset_version=23")
    return out, nodes


def find_attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Standard-domain ``Attention`` nodes of the main graph, excluding block-sparse cores.

    Args:
        model: the ONNX model.
    """
    return [
        n
        for n in model.graph.node
        if n.op_type == "Attention"
        and (n.domain or "") in ("", "ai.onnx")
        and not n.name.startswith(BLOCK_SPARSE_NODE_PREFIX)
    ]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """name -> shape (ints for static dims, dim_param strings or None otherwise)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[int | str | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for init in inferred.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    out.update({i.name: i.data_type for i in inferred.graph.initializer})
    return out


def _used_names(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for n in model.graph.node:
        used.update(i for i in n.input if i)
    return used


def _check_supported(node: onnx.NodeProto, used: set[str]) -> dict:
    attrs = _attrs(node)
    ins = list(node.input) + [""] * (6 - len(node.input))
    if ins[4] or ins[5]:
        raise AttentionLoweringError(f"Attention node {node.name!r} has past_key/past_value (KV cache); not supported")
    if len(node.input) > 6 and node.input[6]:
        raise AttentionLoweringError(f"Attention node {node.name!r} uses nonpad_kv_seqlen; not supported")
    if any(o and o in used for o in list(node.output)[1:]):
        raise AttentionLoweringError(f"Attention node {node.name!r}: only output 0 (Y) may be consumed")
    if attrs.get("softcap", 0.0):
        raise AttentionLoweringError(f"Attention node {node.name!r} has softcap={attrs['softcap']}; not supported")
    return attrs


def _head_counts(node: onnx.NodeProto, attrs: dict, shapes: dict) -> tuple[int, int, int, int]:
    """(rank, H, Hkv, D) of an Attention node, from static shapes or q/kv_num_heads."""
    qs, ks = shapes.get(node.input[0]), shapes.get(node.input[1])
    if qs is None or ks is None:
        raise AttentionLoweringError(f"Attention node {node.name!r}: shapes of Q/K unknown after shape inference")
    if len(qs) == 4:
        H, D, Hkv = qs[1], qs[3], ks[1]
    elif len(qs) == 3:
        H, Hkv = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
        D = qs[2] // H if isinstance(qs[2], int) and H else None
    else:
        raise AttentionLoweringError(f"Attention node {node.name!r}: Q rank {len(qs)} is not 3 or 4")
    if not all(isinstance(x, int) and x > 0 for x in (H, Hkv, D)):
        raise AttentionLoweringError(
            f"Attention node {node.name!r}: need static heads and head dim, got H={H}, Hkv={Hkv}, D={D}"
        )
    return len(qs), H, Hkv, D


def _remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes none of whose outputs is used (repeat to a fixed point); returns count."""
    removed = 0
    while True:
        used = _used_names(model)
        keep = [n for n in model.graph.node if any(o in used for o in n.output if o)]
        dropped = len(model.graph.node) - len(keep)
        if not dropped:
            break
        removed += dropped
        del model.graph.node[:]
        model.graph.node.extend(keep)
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    vis = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vis)
    used = _used_names(model)
    inits = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return removed


def _set_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for imp in model.opset_import:
        if (imp.domain or "") == domain:
            imp.version = max(imp.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def _replace_nodes(model: onnx.ModelProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Swap node i for replacements[i] in place, keeping topological order."""
    new_nodes = []
    for i, n in enumerate(model.graph.node):
        new_nodes.extend(replacements.get(i, [n]))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


# ----------------------------------------------------------------------------------------
# dense fused lowering
# ----------------------------------------------------------------------------------------


def _to_ms_mha(node: onnx.NodeProto, attrs: dict, shapes: dict, types: dict, k: int) -> list[onnx.NodeProto]:
    """Rewrite one opset-23 Attention node into com.microsoft MultiHeadAttention."""
    rank, H, Hkv, D = _head_counts(node, attrs, shapes)
    if Hkv != H:
        raise AttentionLoweringError(
            f"Attention node {node.name!r} is GQA (H={H}, Hkv={Hkv}); com.microsoft MultiHeadAttention needs H == Hkv"
        )
    e = NodeBuilder(f"ms_mha/{k}/")
    q, key, val = node.input[0], node.input[1], node.input[2]
    mask = node.input[3] if len(node.input) > 3 else ""
    if rank == 4:
        # MHA wants query (B, S, H*D); key/value may stay BNSH (B, H, L, D)
        q = e.op("Reshape", e.op("Transpose", q, perm=[0, 2, 1, 3]), e.const([0, 0, H * D]))  # (B, S, H*D)
    bias = ""
    if mask:
        mshape = shapes.get(mask)
        if mshape is None:
            raise AttentionLoweringError(f"Attention node {node.name!r}: mask {mask!r} has unknown rank")
        if types.get(mask) == TensorProto.BOOL:
            # bool True = attend -> additive 0 / float32 minimum (finite: no NaN on empty rows)
            bias = e.op("Where", mask, e.const(0.0, np.float32), e.const(np.finfo(np.float32).min, np.float32))
        else:
            bias = mask
        if len(mshape) != 4:
            # attention_bias must be 4-D (B or 1, H or 1, S, L): prepend unit axes
            bias = e.op("Unsqueeze", bias, e.const(list(range(4 - len(mshape)))))
        if len(mshape) < 2 or mshape[-2] == 1:
            # ORT's CPU kernels reject a bias broadcast along the query axis: expand it to S
            # (batch/head axes may stay 1: MHA accepts (B or 1, H or 1, S, L))
            s_axis = 2 if rank == 4 else 1
            s_1d = e.op("Slice", e.op("Shape", node.input[0]), e.const([s_axis]), e.const([s_axis + 1]))
            bshape = e.op("Shape", bias)
            target = e.op(
                "Concat",
                e.op("Slice", bshape, e.const([0]), e.const([2])),
                s_1d,
                e.op("Slice", bshape, e.const([3]), e.const([4])),
                axis=0,
            )
            bias = e.op("Expand", bias, target)  # (B', H', S, L)
    mha_attrs: dict[str, int | float] = {"num_heads": H}
    if attrs.get("scale") is not None:
        mha_attrs["scale"] = float(attrs["scale"])
    if attrs.get("is_causal", 0):
        mha_attrs["unidirectional"] = 1
    # MHA inputs: query, key, value, bias, key_padding_mask, attention_bias
    y = node.output[0]
    core_out = f"{y}/mha" if rank == 4 else y
    mha_in = [q, key, val, "", "", bias] if bias else [q, key, val]
    e.op("MultiHeadAttention", *mha_in, out=core_out, name=f"ms_mha/{k}/core", domain="com.microsoft", **mha_attrs)
    if rank == 4:
        o4 = e.op("Reshape", core_out, e.const([0, 0, H, D]))  # (B, S, H, D)
        e.op("Transpose", o4, perm=[0, 2, 1, 3], out=y)  # (B, H, S, D)
    return e.nodes


def lower_to_fused_attention(
    model: onnx.ModelProto,
    *,
    op: Literal["onnx_attention", "ms_mha"] = "onnx_attention",
    allow_noop: bool = False,
) -> tuple[onnx.ModelProto, int]:
    """Lower SDPA attention to one fused op per layer.

    Args:
        model: a model exported with ``torch.onnx.export(dynamo=True, opset_version=23)``.
        op: ``"onnx_attention"`` keeps (and counts) the opset-23 ``Attention`` nodes;
            ``"ms_mha"`` rewrites each into com.microsoft ``MultiHeadAttention`` (bool or
            additive mask -> ``attention_bias``, ``is_causal`` -> ``unidirectional``).
        allow_noop: return count 0 instead of raising when no Attention node exists.

    Returns:
        ``(model, count)``: a new model and the number of nodes confirmed / rewritten.
    """
    if op not in ("onnx_attention", "ms_mha"):
        raise ValueError(f"op must be 'onnx_attention' or 'ms_mha', got {op!r}")
    out, nodes = _copy_with_attention_nodes(model, allow_noop)
    if not nodes:
        return out, 0
    used = _used_names(out)
    for n in nodes:
        _check_supported(n, used)
    if op == "onnx_attention":
        logger.info("confirmed %d opset-23 Attention node(s)", len(nodes))
        return out, len(nodes)
    shapes, types = _shapes(out), _elem_types(out)
    positions = {id(n): i for i, n in enumerate(out.graph.node)}
    repl = {positions[id(n)]: _to_ms_mha(n, _attrs(n), shapes, types, k) for k, n in enumerate(nodes)}
    _replace_nodes(out, repl)
    _set_opset(out, "com.microsoft", 1)
    _remove_dead_nodes(out)
    logger.info("rewrote %d Attention node(s) into com.microsoft MultiHeadAttention", len(nodes))
    return out, len(nodes)


# ----------------------------------------------------------------------------------------
# block-sparse lowering
# ----------------------------------------------------------------------------------------


def _key_padding_from_mask(e: NodeBuilder, mask: str, q: str, shapes: dict, types: dict) -> str:
    """(B, L) bool key padding from a dense (…, S, L) mask: its last query row.

    The last query row sees every real key under both bidirectional and causal masks, so
    it equals the key padding whenever the mask is "structure AND padding" (what HF emits).
    """
    mshape = shapes.get(mask)
    if not mshape or len(mshape) < 2:
        raise AttentionLoweringError(f"mask {mask!r}: rank unknown or < 2")
    last = e.op("Slice", mask, e.const([-1]), e.const([_INT64_MAX]), e.const([len(mshape) - 2]))  # (…, 1, L)
    if len(mshape) == 4:
        row = e.op("Gather", last, e.const(0), axis=1)  # (B', 1, L): first head (mask heads are 1 or identical)
        row = e.op("Squeeze", row, e.const([1]))  # (B', L)
    elif len(mshape) == 3:
        row = e.op("Squeeze", last, e.const([1]))  # (B', L)
    else:
        row = last  # (1, L)
    if types.get(mask) == TensorProto.BOOL:
        kpm = row
    else:
        kpm = e.op("Greater", row, e.const(FLOAT_MASK_THRESHOLD, np.float32))
    b_1d = e.op("Slice", e.op("Shape", q), e.const([0]), e.const([1]))
    return e.op("Expand", kpm, e.op("Concat", b_1d, e.const([1]), axis=0))  # (B, L)


def lower_to_block_sparse(
    model: onnx.ModelProto,
    pattern: BlockSparsePattern,
    *,
    key_padding: Literal["from_mask", "none"] = "from_mask",
    allow_noop: bool = False,
) -> tuple[onnx.ModelProto, int]:
    """Replace every opset-23 ``Attention`` node with the block-sparse subgraph.

    Args:
        model: a model exported with ``torch.onnx.export(dynamo=True, opset_version=23)``.
        pattern: block pattern applied to every layer.  For ``explicit`` patterns the
            graph gains inputs ``block_index`` / ``block_mask`` shared by all layers.
        key_padding: ``"from_mask"`` (default) keeps the padding semantics of the node's
            mask: the key padding is taken from the mask's last query row (bool True /
            additive > -1e4 = attend); any other structure in the mask (causality, HF
            windows, non-binary biases) is replaced by ``pattern``.  ``"none"`` drops the
            mask (correct only for unpadded inputs) so its dense (B, 1, S, L) computation
            is removed as dead code.
        allow_noop: return count 0 instead of raising when no Attention node exists.

    Returns:
        ``(model, count)``: a new model and the number of Attention nodes replaced.
    """
    if key_padding not in ("from_mask", "none"):
        raise ValueError(f"key_padding must be 'from_mask' or 'none', got {key_padding!r}")
    out, nodes = _copy_with_attention_nodes(model, allow_noop)
    if not nodes:
        return out, 0
    used = _used_names(out)
    shapes, types = _shapes(out), _elem_types(out)
    existing = {n.name.split("/")[1] for n in out.graph.node if n.name.startswith(BLOCK_SPARSE_NODE_PREFIX)}
    first_index = max((int(x) for x in existing if x.isdigit()), default=-1) + 1
    bi = bm = None
    if pattern.kind == "explicit":
        bi, bm = "block_index", "block_mask"
        out.graph.input.append(helper.make_tensor_value_info(bi, TensorProto.INT64, ["n_superblocks", "kb"]))
        out.graph.input.append(
            helper.make_tensor_value_info(bm, TensorProto.BOOL, ["n_superblocks", pattern.superblock, "kb_tokens"])
        )
    positions = {id(n): i for i, n in enumerate(out.graph.node)}
    repl: dict[int, list[onnx.NodeProto]] = {}
    for j, node in enumerate(nodes):
        attrs = _check_supported(node, used)
        rank, H, Hkv, D = _head_counts(node, attrs, shapes)
        index = first_index + j
        e = NodeBuilder(f"{BLOCK_SPARSE_NODE_PREFIX}{index}/io_")
        q, k, v = node.input[0], node.input[1], node.input[2]
        mask = node.input[3] if len(node.input) > 3 else ""
        if attrs.get("is_causal", 0) and not pattern.is_causal:
            logger.warning("Attention %r is causal but pattern %r is bidirectional", node.name, pattern.kind)
        q_orig = q
        if rank == 3:
            # (B, S, H*D) -> (B, H, S, D)
            def to4(t: str, heads: int, e: NodeBuilder = e, D: int = D) -> str:
                return e.op("Transpose", e.op("Reshape", t, e.const([0, 0, heads, D])), perm=[0, 2, 1, 3])

            q, k, v = to4(q, H), to4(k, Hkv), to4(v, Hkv)
        kpm = None
        if mask and key_padding == "from_mask":
            kpm = _key_padding_from_mask(e, mask, q_orig, shapes, types)
        y = node.output[0]
        sparse_out = y if rank == 4 else f"{y}/bnsh"
        sub: list[onnx.NodeProto] = []
        add_block_sparse_attention(
            sub,
            q,
            k,
            v,
            pattern,
            output=sparse_out,
            num_heads=H,
            head_dim=D,
            num_kv_heads=Hkv,
            key_padding_mask=kpm,
            scale=attrs.get("scale"),
            block_index=bi,
            block_mask=bm,
            index=index,
        )
        tail = NodeBuilder(f"{BLOCK_SPARSE_NODE_PREFIX}{index}/io_out_")
        if rank == 3:
            t = tail.op("Transpose", sparse_out, perm=[0, 2, 1, 3])  # (B, S, H, D)
            tail.op("Reshape", t, tail.const([0, 0, H * D]), out=y)  # (B, S, H*D)
        repl[positions[id(node)]] = e.nodes + sub + tail.nodes
    _replace_nodes(out, repl)
    _set_opset(out, "", 23)
    removed = _remove_dead_nodes(out)
    logger.info(
        "replaced %d Attention node(s) with block-sparse %s subgraphs (%d dead nodes removed)",
        len(nodes),
        pattern.kind,
        removed,
    )
    return out, len(nodes)


def mask_attention_with_input(model: onnx.ModelProto, input_name: str = "pattern_mask") -> onnx.ModelProto:
    """Dense baseline: restrict every ``Attention`` by an extra (S, L) bool graph input.

    Each node's mask becomes ``mask AND input`` (bool masks), ``mask + where(input, 0, -inf)``
    (additive masks) or just the input (no mask; ``is_causal`` is kept).  Feeding
    :func:`exporters.block_sparse_graph.pattern_token_mask` gives the dense computation that
    :func:`lower_to_block_sparse` must reproduce (used by benchmarks for correctness).

    Args:
        model: model with opset-23 Attention nodes.
        input_name: name of the new (S, L) bool graph input.
    """
    out = copy.deepcopy(model)
    nodes = find_attention_nodes(out)
    if not nodes:
        raise AttentionLoweringError("no opset-23 Attention node found")
    out.graph.input.append(helper.make_tensor_value_info(input_name, TensorProto.BOOL, ["pattern_q", "pattern_k"]))
    types = _elem_types(out)
    head = NodeBuilder("pattern_mask/")
    zero, ninf = head.const(0.0, np.float32), head.const(-np.inf, np.float32)
    additive = head.op("Where", input_name, zero, ninf)  # (S, L) 0 / -inf
    combined: dict[str, str] = {}
    before: dict[int, list[onnx.NodeProto]] = {}
    positions = {id(n): i for i, n in enumerate(out.graph.node)}
    for k, node in enumerate(nodes):
        mask = node.input[3] if len(node.input) > 3 else ""
        e = NodeBuilder(f"pattern_mask/{k}/")
        if not mask:
            new = input_name
        elif mask in combined:
            new = combined[mask]
        elif types.get(mask) == TensorProto.BOOL:
            new = e.op("And", mask, input_name)
        else:
            new = e.op("Add", mask, additive)
        combined[mask] = new
        before[positions[id(node)]] = e.nodes  # right before the node: its mask already exists
        while len(node.input) < 4:
            node.input.append("")
        node.input[3] = new
    new_nodes = list(head.nodes)
    for i, n in enumerate(out.graph.node):
        new_nodes.extend(before.get(i, []))
        new_nodes.append(n)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out
