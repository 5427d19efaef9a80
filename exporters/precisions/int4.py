"""Precision ``int4``: weight-only 4-bit quantization for decoders with ONNX Runtime's ``MatMulNBits``.

Wraps ``onnxruntime.quantization.matmul_nbits_quantizer`` (ORT >= 1.20; checked on 1.32):

- **Linear layers** (constant-weight ``MatMul``; ``Gemm`` with a constant weight is first rewritten to
  ``MatMul`` + bias ``Add``, since the quantizer only takes ``MatMul``) become ``com.microsoft.MatMulNBits``:
  the (K, N) weight is stored as 4-bit blocks of ``block_size`` values along K, each with its own fp32 scale and
  4-bit zero point (asymmetric), and dequantized inside the kernel. Algorithms: ``rtn`` (blockwise
  round-to-nearest, ``DefaultWeightOnlyQuantConfig``), ``hqq`` (half-quadratic quantization, Badri & Shaji
  2023: optimises each block's scale / zero point without data, ``HQQWeightOnlyQuantConfig``) and ``gptq`` (Frantar et al. 2023, arXiv:2210.17323: second-order error
  compensation on calibration activations; ORT's vendored Neural-Compressor ``gptq_quantize``).
- **Embeddings** (optional): constant 2-D ``Gather`` tables become ``com.microsoft.GatherBlockQuantized``
  (int4 RTN blocks along the hidden axis). HQQ's float zero points are not accepted by GatherBlockQuantized,
  so embeddings always use RTN. The int4 Gather needs ONNX opset >= 21: an older model is converted with
  ``onnx.version_converter`` first.
- **LM head** (the last constant-weight MatMul/Gemm on the path to the first graph output): ``int4`` like the
  rest, ``int8`` (8-bit ``MatMulNBits``, RTN) or ``fp32`` (left alone).

Norms, Softmax and residual Adds are never touched (weight-only: every activation stays fp32).
``accuracy_level`` sets the compute type of the activations inside MatMulNBits (4 = int8 dot products).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from exporters.graph import GraphIndex
from exporters.onnx import save_onnx
from exporters.precision_registry import ConversionJob, Int4Options
from exporters.quantize import _name_nodes, _select_feeds

__all__ = ["convert", "lm_head_node"]

logger = logging.getLogger(__name__)

_INT4_MIN_OPSET = 21  # int4 / uint4 tensor types (GatherBlockQuantized data) need opset 21, IR 10
_WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})
# ops an LM head's output may pass through on its way to the logits output
_PASS_THROUGH = frozenset({"Reshape", "Add", "Cast", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Flatten"})


def _const_arrays(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(A, W[, C])`` with a constant W, alpha = 1, transA = 0 (and beta = 1 when C is given) into
    ``MatMul(A, W or W^T)`` (+ ``Add(., C)``), keeping the node name on the MatMul. Returns how many were
    rewritten. (A, W): (M, K) @ (K, N); ``transB`` = 1 stores W as (N, K), so its transpose is stored instead."""
    graph = model.graph
    inits = _const_arrays(graph)
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm"
            and len(node.input) >= 2
            and node.input[1] in inits
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("transA", 0) == 0
            and (len(node.input) < 3 or not node.input[2] or attrs.get("beta", 1.0) == 1.0)
        )
        if not ok:
            new_nodes.append(node)
            continue
        w_name = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[w_name]).T  # (N, K) -> (K, N)
            w_name = f"{w_name}_transposed_for_{node.name}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        has_bias = len(node.input) >= 3 and bool(node.input[2])
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=node.name))
        if has_bias:
            new_nodes.append(
                onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias")
            )
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def _fold_transposed_weights(model: onnx.ModelProto) -> int:
    """``MatMul(x, Transpose(W))`` with a constant 2-D W (a tied LM head: the embedding table (V, H) is read by
    the Gather and, transposed to (H, V), by the head) -> ``MatMul(x, W^T)`` with W^T stored as its own constant,
    so the quantizer sees a constant weight. The Transpose is dropped when nothing else reads it. Returns how
    many MatMuls now read a folded constant."""
    graph = model.graph
    inits = _const_arrays(graph)
    producer = GraphIndex(graph).producer
    folded: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        tr = producer.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits or len(inits[tr.input[0]].dims) != 2:
            continue
        perm = [a.ints for a in tr.attribute if a.name == "perm"]
        if perm and list(perm[0]) != [1, 0]:
            continue
        out = tr.output[0]
        if out not in folded:
            name = f"{tr.input[0]}_transposed"
            w = numpy_helper.to_array(inits[tr.input[0]]).T  # (V, H) -> (H, V) = (K, N)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
            folded[out] = name
        node.input[1] = folded[out]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in folded.keys() - used)]
    del graph.node[:]
    graph.node.extend(keep)
    return sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in folded.values())


def lm_head_node(model: onnx.ModelProto) -> str | None:
    """Name of the LM head: the constant-weight ``MatMul``/``Gemm`` (or one reading a transposed constant: a tied
    head) reached from the first graph output (the logits) backwards through reshapes, casts and the bias ``Add``
    only; None when there is none."""
    graph = model.graph
    producer = GraphIndex(graph).producer
    inits = set(_const_arrays(graph))
    frontier = [graph.output[0].name] if graph.output else []
    seen: set[str] = set()
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            w = producer.get(node.input[1]) if len(node.input) > 1 else None
            tied = w is not None and w.op_type == "Transpose" and w.input[0] in inits  # before folding
            return node.name if len(node.input) > 1 and (node.input[1] in inits or tied) else None
        if node.op_type in _PASS_THROUGH:
            frontier.extend(i for i in node.input if i and i not in inits)
    return None


def _embedding_gathers(model: onnx.ModelProto, block_size: int) -> list[str]:
    """Gather nodes that read a constant float 2-D table of at least ``block_size`` columns (embeddings)."""
    inits = _const_arrays(model.graph)
    out = []
    for n in model.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "Gather" and n.input else None
        if t is not None and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[1] >= block_size:
            out.append(n.name)
    return out


def _ensure_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` at ONNX opset >= ``opset`` (converted with onnx's version converter when below)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors naming the adapter
        raise ValueError(
            f"int4 embeddings need ONNX opset >= {opset} and the model's opset {current} could not be converted"
            f" ({str(exc).splitlines()[0][:200]}); set quantize.int4.embeddings: false"
        ) from None
    converted.ir_version = max(converted.ir_version, 10)
    return converted


def _quantizer_module() -> Any:
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without its side effect on logging: on
    import it calls ``logging.basicConfig(level=INFO)``, which would print a line per graph node to the user's
    terminal; the root logger's handlers and level are restored and its own logger is set to WARNING."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    return mnq


class _Dataloader:
    """ORT's Neural-Compressor GPTQ reads ``(feeds, label)`` pairs and a ``batch_size`` attribute."""

    batch_size = 1

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = feeds

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], None]]:
        return ((f, None) for f in self._feeds)


def _nbits(
    model: onnx.ModelProto,
    *,
    bits: int,
    block_size: int,
    accuracy_level: int,
    algorithm: str,
    op_types: tuple[str, ...],
    exclude: set[str],
) -> onnx.ModelProto:
    """One pass of ``MatMulNBitsQuantizer`` over ``op_types`` (``rtn`` or ``hqq``), skipping ``exclude``."""
    mnq = _quantizer_module()
    config: Any
    if algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=op_types)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=False,  # 4-bit zero point per block: asymmetric ranges (GELU inputs, biased weights)
            accuracy_level=accuracy_level,
            op_types_to_quantize=op_types,
            quant_axes=(("MatMul", 0), ("Gather", 1)),  # blocks along K for weights, along hidden for tables
            bits=bits,
        )
    quant = mnq.MatMulNBitsQuantizer(model, nodes_to_exclude=sorted(exclude), algo_config=config)
    quant.process()
    out = quant.model.model
    if algorithm == "hqq" and accuracy_level:  # HQQ's config has no accuracy level: set it on its nodes
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return out


def _gptq(
    model: onnx.ModelProto, job: ConversionJob, exclude: set[str], feeds: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    """GPTQ through ORT's vendored Neural-Compressor ``gptq_quantize`` (MatMulNBitsQuantizer's GPTQ path
    ignores ``nodes_to_exclude``, so the per-node config is built here: excluded nodes stay ``"fp32"``)."""
    _quantizer_module()
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    inits = _const_arrays(model.graph)
    bs = job.int4.block_size
    config: dict[str, Any] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            k = inits[n.input[1]].dims[0]
            if n.name not in exclude and -(-k // bs) % 2:
                # ORT's GPTQ packs two blocks' zero points per byte across rows: an odd number of blocks per
                # column gives a wrongly shaped zero-point tensor (it raises deep inside; say why here)
                raise ValueError(
                    f"int4 gptq: layer '{n.name}' has K={k}, an odd number of {bs}-value blocks, which ONNX"
                    f" Runtime's GPTQ cannot pack; use int4.block_size {bs // 2} or algorithm rtn/hqq"
                )
            config[n.name] = "fp32" if n.name in exclude else {"bits": 4, "group_size": bs, "scheme": "asym"}
    with contextlib.redirect_stdout(io.StringIO()):  # it draws a progress bar on stdout
        out = gptq_quantize(
            model,
            _Dataloader(feeds),
            weight_config=config,
            num_bits=4,
            group_size=bs,
            scheme="asym",
            n_samples=-1,
            accuracy_level=job.int4.accuracy_level,
        )
    return out.model


def _rtn_only(
    model: onnx.ModelProto, names: set[str], *, bits: int, op_type: str, opts: Int4Options
) -> onnx.ModelProto:
    """RTN ``bits``-bit blocks (``opts.block_size``) for the ``op_type`` nodes named in ``names`` only."""
    others = {n.name for n in model.graph.node if n.name not in names}
    return _nbits(
        model,
        bits=bits,
        block_size=opts.block_size,
        accuracy_level=opts.accuracy_level,
        algorithm="rtn",
        op_types=(op_type,),
        exclude=others,
    )


def convert(job: ConversionJob) -> tuple[int, list[str], list[str]]:
    """Quantize ``job.src`` to int4 weight-only and write ``job.tmp``; returns (weight-only nodes, float op
    types with constant weights kept, notes). Raises ValueError for an unsupported setting."""
    opts: Int4Options = job.int4
    model = onnx.load(str(job.src))
    _name_nodes(model)
    gemms = _gemm_to_matmul(model)
    folded = _fold_transposed_weights(model)
    head = lm_head_node(model)
    keep = {n.name for n in model.graph.node if n.op_type in set(job.keep_fp32_ops)}
    body_exclude = keep | ({head} if head is not None and opts.lm_head != "int4" else set())
    tables = _embedding_gathers(model, opts.block_size) if opts.embeddings else []
    if tables:
        model = _ensure_opset(model, _INT4_MIN_OPSET)

    if opts.algorithm == "gptq":
        feeds = [_select_feeds(model, f) for f in job.feeds or []]
        model = _gptq(model, job, body_exclude, feeds)
    else:
        model = _nbits(
            model,
            bits=4,
            block_size=opts.block_size,
            accuracy_level=opts.accuracy_level,
            algorithm=opts.algorithm,
            op_types=("MatMul",),
            exclude=body_exclude,
        )
    if tables:  # embeddings: RTN blocks along the hidden axis (GatherBlockQuantized takes int zero points only)
        model = _rtn_only(model, set(tables), bits=4, op_type="Gather", opts=opts)
    if head is not None and opts.lm_head == "int8":
        model = _rtn_only(model, {head}, bits=8, op_type="MatMul", opts=opts)
    save_onnx(model, job.tmp, external=job.external)

    floats = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    lowered = sum(1 for n in model.graph.node if n.op_type in _WEIGHT_ONLY_OPS)
    weight_input = {"MatMul": 1, "Gemm": 1, "Gather": 0}  # where each op reads its weight / table
    float_weights = sorted(  # op types that still read an fp32 weight (asked for, or not quantizable)
        {
            n.op_type
            for n in model.graph.node
            if n.op_type in weight_input
            and len(n.input) > weight_input[n.op_type]
            and n.input[weight_input[n.op_type]] in floats
        }
    )
    notes = [
        f"int4 weight-only ({opts.algorithm}, block {opts.block_size}, accuracy_level {opts.accuracy_level}):"
        f" {lowered} MatMulNBits/GatherBlockQuantized nodes; embeddings {'int4' if tables else 'fp32'};"
        f" LM head {opts.lm_head if head is not None else 'not found'}"
    ]
    if gemms:
        notes.append(f"{gemms} Gemm with constant weights rewritten as MatMul + Add first")
    if folded:
        notes.append(f"{folded} MatMul reading a transposed constant (tied LM head) given its own constant")
    logger.info("%s", notes[0])
    return lowered, float_weights, notes
