"""Quantizable units of an exported ONNX transformer, labelled by transformer block and role.

A *unit* is what mixed precision keeps or lowers as one: at granularity ``matmul`` one weight-carrying node
(a MatMul/Gemm with a constant weight, or an embedding ``Gather`` when embeddings are quantized); at ``block``
every such node of one transformer block, plus one unit for all embeddings and one for the head (pooler, LM
head, classifier).

The exporters drop node metadata for byte-reproducible graphs (exporters/onnx.py), so node names
(``n16_MatMul``) say nothing about the layer. Units are therefore labelled by *value*: each constant weight is
matched to the PyTorch parameter it came from (bit-identical, as stored or transposed), and the parameter's
block and role come from the pruning adapters (:func:`pipeline.pruning.adapters.blocks`): q, k, v, o, ffn_in,
ffn_out (fused GPT-2 ``c_attn`` = ``qkv``). Weights that match no parameter keep their node name as label.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["GRANULARITIES", "Unit", "quantizable_units"]

GRANULARITIES: tuple[str, ...] = ("matmul", "block")
Granularity = Literal["matmul", "block"]


@dataclass(frozen=True)
class Unit:
    """One unit of mixed precision.

    Attributes:
        name: label, e.g. ``block3.q``, ``block3``, ``embeddings.word_embeddings``, ``head``, or a node name.
        block: transformer block index, or None (embeddings, head, unlabelled).
        role: ``q``/``k``/``v``/``o``/``qkv``/``ffn_in``/``ffn_out``, ``block``, ``embeddings``, ``head`` or
            ``linear`` (unlabelled).
        nodes: names of the ONNX nodes (of the source graph, as named by ``exporters.quantize``) in this unit.
        params: number of weight elements in the unit.
    """

    name: str
    block: int | None
    role: str
    nodes: tuple[str, ...]
    params: int


def _fingerprint(a: np.ndarray) -> tuple[tuple[int, ...], str]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return a.shape, hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = a.t
    return out


def weight_nodes(model: onnx.ModelProto, op_types: Sequence[str]) -> list[tuple[onnx.NodeProto, str]]:
    """(node, weight tensor name) for each node the int8 paths can quantize: MatMul/Gemm whose input 1 is a
    2-D float constant, and (if ``"Gather"`` in ``op_types``) Gather whose table (input 0) is one."""
    consts = _constants(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        idx = 0 if n.op_type == "Gather" else 1
        if len(n.input) <= idx or n.input[idx] not in consts:
            continue
        t = consts[n.input[idx]]
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT:
            out.append((n, n.input[idx]))
    return out


def block_roles(view: Any) -> dict[str, Any]:
    """A block's matrices by role, with a single FFN input called ``ffn_in`` (adapters say ``ffn_in.0``;
    Llama's gate and up stay ``ffn_in.0`` / ``ffn_in.1``)."""
    single = len(view.ffn_in) == 1
    return {("ffn_in" if single and r.startswith("ffn_in") else r): m for r, m in view.matrices().items()}


def _torch_labels(torch_model: Any) -> dict[tuple[tuple[int, ...], str], tuple[int | None, str, str]]:
    """fingerprint of a weight (as stored and transposed) -> (block, role, parameter name)."""
    import torch

    from pipeline.pruning.adapters import blocks

    roles: dict[int, tuple[int, set[str]]] = {}
    try:
        views = blocks(torch_model)
    except (ValueError, NotImplementedError, AttributeError, TypeError):
        views = []  # a family the adapters do not know: only embeddings/head get labels
    for b in views:
        for role, ref in block_roles(b).items():
            roles.setdefault(id(ref.module.weight), (b.index, set()))[1].add(role)
    embed_ids = {id(m.weight) for m in torch_model.modules() if isinstance(m, torch.nn.Embedding)}
    out: dict[tuple[tuple[int, ...], str], tuple[int | None, str, str]] = {}
    for pname, p in torch_model.named_parameters():
        if p.ndim != 2:
            continue
        if id(p) in roles:
            block, rs = roles[id(p)]
            role = "qkv" if rs == {"q", "k", "v"} else "+".join(sorted(rs))
            label: tuple[int | None, str, str] = (block, role, pname)
        else:
            label = (None, "embeddings" if id(p) in embed_ids else "head", pname)
        w = p.detach().float().cpu().numpy()
        out.setdefault(_fingerprint(w), label)
        out.setdefault(_fingerprint(w.T), label)
    return out


def _short(pname: str) -> str:
    """``model.embeddings.word_embeddings.weight`` -> ``word_embeddings``."""
    parts = [p for p in pname.split(".") if p not in ("weight", "model")]
    return parts[-1] if parts else pname


def quantizable_units(
    model: onnx.ModelProto,
    op_types: Sequence[str],
    *,
    torch_model: Any | None = None,
    granularity: Granularity = "matmul",
) -> list[Unit]:
    """The units of ``model`` (node names must already be set, see ``exporters.quantize._name_nodes``).

    Args:
        model: the fp32 source graph (weights loaded).
        op_types: op types the int8 path quantizes (``MatMul``, ``Gemm`` [, ``Gather``]).
        torch_model: the PyTorch model the graph was exported from, for block/role labels; None = node names.
        granularity: ``matmul`` (one unit per weight node) or ``block`` (per transformer block, embeddings, head).

    Returns:
        Units in graph order (embeddings, blocks 0..L-1, head for a transformer).

    Raises:
        ValueError: unknown granularity.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    labels = _torch_labels(torch_model) if torch_model is not None else {}
    consts = _constants(model)
    grouped: dict[str, dict[str, Any]] = {}
    for node, wname in weight_nodes(model, op_types):
        arr = numpy_helper.to_array(consts[wname])
        block, role, pname = labels.get(_fingerprint(arr), (None, "linear", node.name))
        if granularity == "block" and role != "linear":
            name = f"block{block}" if block is not None else role
            role = "block" if block is not None else role
        elif block is not None:
            name = f"block{block}.{role}"
        elif role == "linear":
            name = node.name
        else:
            name = f"{role}.{_short(pname)}"
        g = grouped.setdefault(name, {"block": block, "role": role, "nodes": [], "params": 0})
        g["nodes"].append(node.name)
        g["params"] += int(arr.size)
    units = [Unit(n, g["block"], g["role"], tuple(g["nodes"]), g["params"]) for n, g in grouped.items()]
    rank = {"embeddings": 0, "head": 2}
    # embeddings first, then blocks in order (roles in graph order within a block), head last
    return sorted(
        units,
        key=lambda u: (rank.get(u.role, 1), u.block if u.block is not None else 1 << 30),
    )
