"""Per-target precision conversion of an ONNX model: every precision in the registry
(:mod:`exporters.precision_registry`): fp32, fp16, int8 (dynamic), int8 (static QDQ) and int4 (weight-only).

All paths wrap ONNX Runtime's own tooling (``onnxruntime.transformers.float16`` and
``onnxruntime.quantization``) and add the transformer-aware safety defaults that the
published failure reports show are missing:

- **fp16**: a decomposed LayerNorm computes ``Pow(x - mean, 2)``; activations above ~256
  overflow fp16 (max 65504) and the whole norm becomes inf/NaN (ViT-B on TensorRT fell to
  19% top-1). We keep norms (fused and decomposed), Softmax and the residual ``Add`` that
  feeds each norm in fp32, and convert the rest (MatMuls) to fp16 with fp32 model I/O.
- **int8**: quantizing the residual stream (``Add`` outputs) per-tensor collapses accuracy
  when a few tokens/channels carry massive activations (ViT-B default INT8 fell to ~0%).
  We quantize only ``MatMul``/``Gemm`` with constant weights (per-channel int8 weights, u8 or s8:
  see ``INT8_WEIGHT_TYPES``); the residual ``Add``, LayerNorm and Softmax stay fp32.

Every output is written atomically (temp file in the destination folder, then
``os.replace``) and is deterministic: the same input gives byte-identical output.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporters.graph import GraphIndex
from exporters.onnx import data_file, model_bytes, move_onnx, onnx_files, save_onnx
from exporters.precision_registry import DEFAULT_CHUNKED_GATHER_BYTES, ConversionJob, Int4Options, precision_spec

__all__ = [
    "DEFAULT_INT8_OP_TYPES",
    "DEFAULT_KEEP_FP32",
    "INT8_WEIGHT_TYPES",
    "QuantizeReport",
    "convert_precision",
]

logger = logging.getLogger(__name__)

#: int8 weight types. ``"s8"``: s8 weights against u8 activations (u8s8); ``"u8"``: u8 weights (u8u8);
#: ``"s8-reduce-range"``: symmetric s8 weights in [-64, 64] (ORT reduce_range). ONNX Runtime's x86 u8s8 kernel without AVX-VNNI
#: (``vpmaddubsw``) sums two adjacent u8*s8 products into a *saturating* int16: 255*127*2 = 64770 > 32767, so
#: the same model gives different (worse) numbers on such CPUs. u8u8 widens both to int16 first
#: (``vpmaddwd``: exact), and 7-bit weights bound the pair sum to 255*64*2 = 32640 (exact). ARM kernels
#: accumulate in int32 (exact for all three). ORT docs: "quantization on x86 without VNNI: use reduce_range or U8U8".
INT8_WEIGHT_TYPES: tuple[str, ...] = ("s8", "u8", "s8-reduce-range")

#: Op types kept in fp32 by the fp16 path (and never quantized by the int8 paths).
#: Norms overflow or lose precision in fp16; Softmax's exp/sum likewise. Decomposed norms
#: and residual Adds are found structurally (see ``_fp32_node_names``), not by op type,
#: because a bare ``Add``/``Div`` also appears in harmless places.
DEFAULT_KEEP_FP32: tuple[str, ...] = (
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "Softmax",
)

# Ops that make up the tail of a decomposed norm after the Pow:
# ReduceMean -> Add(eps) -> Sqrt -> Div | Reciprocal -> Mul -> Mul(gamma) -> Add(beta).
_NORM_TAIL_OPS = frozenset({"ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul"})
_NORM_TAIL_DEPTH = 7
#: Op types quantized by default on the int8 paths: the linear layers only.
DEFAULT_INT8_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")
_INT8_DYNAMIC_OPS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention"})


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`convert_precision` did.

    Attributes:
        precision: the requested precision.
        size_bytes: size of the written model file.
        nodes_quantized: nodes now computing in the lower precision (fp16 nodes for
            ``fp16``; integer MatMul/Gemm nodes for ``int8``; MatMul/Gemm nodes with a
            dequantized weight for ``int8-static``; 0 for ``fp32``).
        ops_kept_fp32: sorted op types of the float nodes deliberately kept in fp32.
        notes: human-readable remarks (fallbacks, options used).
    """

    precision: str
    size_bytes: int
    nodes_quantized: int
    ops_kept_fp32: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def convert_precision(
    src: Path,
    dst: Path,
    precision: str,
    *,
    calibration_feeds: Iterable[dict[str, np.ndarray]] | None = None,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32,
    per_channel: bool = True,
    optimize_fp32: bool = False,
    int8_op_types: Sequence[str] = DEFAULT_INT8_OP_TYPES,
    quantize_matmul_outputs: bool = False,
    weight_type: str = "u8",
    nodes_to_exclude: Sequence[str] = (),
    int4: Int4Options | None = None,
    chunked_gather_bytes: int | None = DEFAULT_CHUNKED_GATHER_BYTES,
) -> QuantizeReport:
    """Convert ``src`` to ``precision`` and write it atomically to ``dst``.

    Args:
        src: input ``.onnx`` (fp32, weights inline).
        dst: output path; its folder is created if needed.
        precision: a registered precision (:func:`exporters.precision_registry.precision_names`): ``"fp32"`` (copy,
            or ORT-optimized if ``optimize_fp32``), ``"fp16"``, ``"int8"`` (dynamic, weights only),
            ``"int8-static"`` (QDQ with calibration) or ``"int4"`` (weight-only MatMulNBits, see ``int4``).
        calibration_feeds: ``name -> array`` feeds; required for ``int8-static`` (ranges
            are calibrated on them) and int4 GPTQ, used for the parity check of ``optimize_fp32``.
        keep_fp32_ops: op types never lowered (fp16) / never quantized (int8).
        per_channel: per-output-channel weight scales for the int8 paths (MiniLM dynamic int8:
            embedding cosine to PyTorch 0.955 per-tensor -> 0.988 per-channel).
        optimize_fp32: for ``fp32``, save ORT's ``ORT_ENABLE_EXTENDED`` offline
            optimization (not ``ENABLE_ALL``, whose layouts are hardware-specific) when it
            keeps parity on ``calibration_feeds`` (atol 1e-4); else copy unchanged.
        int8_op_types: op types the int8 paths quantize (only nodes with a constant weight).
            Default: the linear layers, ``("MatMul", "Gemm")``. Adding ``"Gather"`` also
            quantizes embedding tables (``int8`` only): ~4x smaller instead of ~1.5x, at a small
            fidelity cost (see benchmarks/results/quantization.md). Never add ``"Attention"``
            (opset-23 Attention becomes an invalid QAttention) or ``"Add"`` (residual collapse).
        quantize_matmul_outputs: ``int8-static`` only. ORT's QDQ default also puts Q/DQ on
            every MatMul *output*, i.e. per-tensor rounding right before the bias/residual Add;
            on MiniLM that cost cosine 0.989 -> 0.928 (mean). Off by default; turn on for EPs that
            need a full ``DQ -> MatMul -> Q`` group to pick an int8 kernel (QLinearMatMul).
        weight_type: int8 paths: one of :data:`INT8_WEIGHT_TYPES`. Default ``"u8"``: exact on every CPU
            (targets choose via ``TargetProfile.int8_weight_type``: u8 on x86_64, s8 on ARM).
        nodes_to_exclude: int8 paths: node names left in fp32 on top of ``keep_fp32_ops`` (mixed precision,
            see pipeline.sensitivity). Names are those of ``src`` (unnamed nodes get ``<op>_<index>``).
        int4: ``int4`` only: block size, algorithm, accuracy level, embeddings and LM head
            (:class:`exporters.precision_registry.Int4Options`; default: its defaults).
        chunked_gather_bytes: ``int8`` with ``"Gather"`` in ``int8_op_types``: embedding tables of at least this many
            bytes of fp32 are quantized chunk by chunk before ORT runs (:mod:`exporters.chunked_gather`: the same
            bytes ORT writes, without its table-sized float copies); ``None`` = leave every table to ORT.

    Returns:
        A :class:`QuantizeReport`.

    Raises:
        ValueError: unknown ``precision``, or a precision that needs calibration (``int8-static``, int4 GPTQ)
            without calibration feeds.
        FileNotFoundError: ``src`` does not exist.
    """
    spec = precision_spec(precision)  # ValueError naming the registered precisions
    if weight_type not in INT8_WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {INT8_WEIGHT_TYPES}, got {weight_type!r}")
    unsafe = sorted(set(int8_op_types) & {"Add", "Attention", *keep_fp32_ops})
    if unsafe:
        raise ValueError(f"int8_op_types must not include {unsafe}: they collapse accuracy or break the graph")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"source model not found: {str(src)!r}")
    feeds = None if calibration_feeds is None else list(calibration_feeds)
    dst.parent.mkdir(parents=True, exist_ok=True)

    # a model with external data (model.onnx + model.onnx.data, see exporters.onnx) keeps that split
    external = data_file(src).is_file()
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.", dir=dst.parent) as tmp_dir:
        tmp = Path(tmp_dir) / dst.name
        job = ConversionJob(
            src=src,
            tmp=tmp,
            tmp_dir=Path(tmp_dir),
            external=external,
            feeds=feeds,
            keep_fp32_ops=tuple(keep_fp32_ops),
            per_channel=per_channel,
            optimize_fp32=optimize_fp32,
            int8_op_types=tuple(int8_op_types),
            quantize_matmul_outputs=quantize_matmul_outputs,
            weight_type=weight_type,
            int4=int4 or Int4Options(),
            nodes_to_exclude=tuple(nodes_to_exclude),
            chunked_gather_bytes=chunked_gather_bytes,
        )
        if spec.calibration_needed(job) and not feeds:
            raise ValueError(f"precision '{precision}' needs calibration_feeds (a non-empty iterable of feeds dicts)")
        nodes, kept, notes = spec.load()(job)
        if external:
            notes.append(f"weights in external data ({data_file(dst).name})")
        move_onnx(tmp, dst)  # atomic per file on the same filesystem: data first, then the graph that names it
    report = QuantizeReport(precision, model_bytes(dst), nodes, kept, notes)
    logger.info("%s -> %s (%s): %d nodes lowered, %d bytes", src.name, dst.name, precision, nodes, report.size_bytes)
    return report


# --------------------------------------------------------------------------- graph helpers


def _name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a deterministic unique name (block lists work by node name)."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def _fp32_node_names(model: onnx.ModelProto, keep_fp32_ops: Sequence[str]) -> set[str]:
    """Names of nodes to keep in fp32: listed op types, decomposed norms, and residual Adds feeding a norm.

    A decomposed norm is recognised from its ``Pow`` (LayerNorm: ``Pow(Sub(x, ReduceMean(x)), 2)``;
    RMSNorm: ``Pow(x, 2)``) plus the ``_NORM_TAIL_OPS`` chain after it. The residual ``Add`` is
    the producer of a norm's input ``x``.
    """
    graph = model.graph
    idx = GraphIndex(graph)
    producer, consumers = idx.producer, idx.consumers
    keep = set(keep_fp32_ops)
    names: set[str] = {n.name for n in graph.node if n.op_type in keep}
    norm_inputs: list[str] = [n.input[0] for n in graph.node if n.op_type in keep and "Norm" in n.op_type and n.input]

    for pow_node in (n for n in graph.node if n.op_type == "Pow"):
        names.add(pow_node.name)
        base = pow_node.input[0]
        src = producer.get(base)
        if src is not None and src.op_type == "Sub":  # LayerNorm: centred input
            names.add(src.name)
            norm_inputs.append(src.input[0])
            mean = producer.get(src.input[1])
            if mean is not None and mean.op_type == "ReduceMean":
                names.add(mean.name)
        else:  # RMSNorm: raw input
            norm_inputs.append(base)
        # Walk the norm tail breadth-first: ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul -> Add.
        frontier, depth = list(pow_node.output), 0
        while frontier and depth < _NORM_TAIL_DEPTH:
            nxt: list[str] = []
            for t in frontier:
                for c in consumers.get(t, []):
                    if c.op_type in _NORM_TAIL_OPS and c.name not in names:
                        names.add(c.name)
                        nxt.extend(c.output)
            frontier, depth = nxt, depth + 1
    # Residual Add: whatever Add produces a norm's input carries the residual stream.
    for t in norm_inputs:
        p = producer.get(t)
        if p is not None and p.op_type == "Add":
            names.add(p.name)
    return names


def _float_ops_kept(model: onnx.ModelProto, node_names: set[str]) -> list[str]:
    return sorted({n.op_type for n in model.graph.node if n.name in node_names})


# --------------------------------------------------------------------------- precisions


def _fp32(
    src: Path, tmp: Path, feeds: list[dict[str, np.ndarray]] | None, optimize: bool
) -> tuple[int, list[str], list[str]]:
    if not optimize:
        for f in onnx_files(src):
            shutil.copyfile(f, tmp.with_name(tmp.name + f.name[len(src.name) :]))  # model.onnx[.data]
        return 0, [], ["copied unchanged"]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp)
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(src), sess_options=opts, providers=["CPUExecutionProvider"])
    if not feeds:
        shutil.copyfile(src, tmp)
        return 0, [], ["optimize_fp32 needs calibration_feeds for the parity check; copied unchanged"]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    opt = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed in feeds[:4]:
        sel = _select_feeds(onnx.load(str(src), load_external_data=False), feed)
        for a, b in zip(ref.run(None, sel), opt.run(None, sel)):
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    if not worst <= 1e-4:
        shutil.copyfile(src, tmp)
        return 0, [], [f"ORT_ENABLE_EXTENDED changed outputs by {worst:.3g} > 1e-4; copied unchanged"]
    return 0, [], [f"ORT_ENABLE_EXTENDED offline optimization (max diff {worst:.3g} on {min(4, len(feeds))} feeds)"]


def _fp16(src: Path, tmp: Path, keep_fp32_ops: Sequence[str], external: bool) -> tuple[int, list[str], list[str]]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load(str(src))
    _name_nodes(model)
    keep_nodes = _fp32_node_names(model, keep_fp32_ops)
    kept = _float_ops_kept(model, keep_nodes)
    # ORT's block list *replaces* its default when given, so union the two.
    op_block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    out = convert_float_to_float16(
        model,
        keep_io_types=True,  # fp32 in/out: callers and tokenizers stay unchanged
        op_block_list=op_block,
        node_block_list=sorted(keep_nodes),
    )
    # The converter puts a Cast(fp32->fp16) after *every* blocked node and a Cast back before the
    # next one, so a chain of fp32 nodes still round-trips each intermediate through fp16
    # (Pow -> fp16 -> inf). Collapse those pairs, as OnnxModel.convert_float_to_float16 does, and
    # restore topological order (the converter appends its Casts at the end of the node list).
    wrapped = OnnxModel(out)
    wrapped.remove_cascaded_cast_nodes()
    wrapped.remove_useless_cast_nodes()
    wrapped.topological_sort()
    out = wrapped.model
    # value_info written by the converter goes stale when Cast pairs are removed; ONNX
    # shape inference (and ORT) recompute types, so drop it rather than ship contradictions.
    del out.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(
        out, strict_mode=True
    )  # before saving: external saving empties tensors
    save_onnx(out, tmp, external=external)
    fp16_tensors = {
        vi.name
        for vi in [*inferred.graph.value_info, *inferred.graph.output]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    }
    lowered = sum(1 for n in inferred.graph.node if n.op_type != "Cast" and any(o in fp16_tensors for o in n.output))
    return lowered, kept, [f"kept {len(keep_nodes)} nodes in fp32 (norms, Softmax, residual Adds); fp32 I/O"]


def _without_shape_hints(path: Path) -> onnx.ModelProto:
    """Drop the intermediate ``value_info`` of an int8 model in place and return its graph (weights left on disk).

    Why: with every intermediate shape declared (the dynamo export declares them all and ORT's quantizer keeps
    them), ONNX Runtime's ``SkipLayerNormFusion`` proves the residual ``Add`` operands equal-shaped and fuses each
    ``Add -> LayerNormalization`` into the contrib ``SkipLayerNormalization``, whose CPU kernel is a scalar loop with
    a division per element: 250 us against 36 us for ``Add`` + ``LayerNormalization`` at (1, 128, 384), on 1 or 2
    threads (ORT 1.32; benchmarks/results/quantization.md). Twelve of them were edgepipe's int8 MiniLM's whole
    per-inference gap to the peer path (optimum export + ``quantize_dynamic``, whose graph declares too few shapes
    for 6 of its 12 norms to fuse). Without the hints ORT infers the shapes it can itself and leaves the norms
    unfused; outputs are unchanged (the hints are optional metadata). Graph inputs/outputs keep their shapes.
    """
    model = onnx.load(str(path), load_external_data=False)
    del model.graph.value_info[:]
    onnx.save(model, str(path))  # external tensors keep pointing at <path>.data: only the graph is rewritten
    return model


def _weight_args(weight_type: str) -> dict:
    """``quantize_*`` keyword arguments for an :data:`INT8_WEIGHT_TYPES` entry."""
    from onnxruntime.quantization import QuantType

    return {
        "weight_type": QuantType.QUInt8 if weight_type == "u8" else QuantType.QInt8,
        "reduce_range": weight_type == "s8-reduce-range",
    }


def _int8_dynamic(
    src: Path,
    tmp: Path,
    keep_fp32_ops: Sequence[str],
    per_channel: bool,
    op_types: Sequence[str],
    weight_type: str,
    external: bool = False,
    nodes_to_exclude: Sequence[str] = (),
    chunked_gather_bytes: int | None = DEFAULT_CHUNKED_GATHER_BYTES,
) -> tuple[int, list[str], list[str]]:
    from onnxruntime.quantization import quantize_dynamic

    from exporters.chunked_gather import hide_tables, prequantize_gather_tables, restore_tables

    model = onnx.load(str(src), load_external_data=not external)
    _name_nodes(model)
    excluded = {n.name for n in model.graph.node if n.op_type in set(keep_fp32_ops)} | set(nodes_to_exclude)
    # quantize_dynamic first rewrites a Gemm as MatMul + Add named "<gemm>_MatMul", and checks exclusion on that
    excluded |= {f"{n.name}_MatMul" for n in model.graph.node if n.op_type == "Gemm" and n.name in excluded}
    exclude = sorted(excluded)
    # Hand ORT a file: given a ModelProto, quantize_dynamic deep-copies it, saves the copy and loads it back, three
    # more copies of the weights in memory (the 2.4 GB encoder of issue 11 was killed at 14 GB). The named graph goes
    # beside its own data file (ORT writes beside its input; onnx refuses hard links).
    named = tmp.parent / "named" / src.name
    named.parent.mkdir()
    # Large embedding tables first, chunk by chunk (ORT's quantizer would hold each as several float copies); with
    # external data this also copies every other tensor into named's data file, renumbering offsets.
    chunked = prequantize_gather_tables(
        model,
        src_data=data_file(src) if external else None,
        dst_data=data_file(named) if external else None,
        op_types=op_types,
        excluded=exclude,
        min_bytes=chunked_gather_bytes,
    )
    hidden = hide_tables(model, chunked)  # graph inputs while ORT runs: its quantizer copies each initializer ~3 times
    model_input: onnx.ModelProto | str = model
    if external or chunked:
        onnx.save_model(model, str(named))  # graph only when external: its tensors point at the data file by name
        model_input = str(named)
        del model
    with _without_already_quantized_warning() if chunked else contextlib.nullcontext():
        quantize_dynamic(
            model_input,
            str(tmp),
            op_types_to_quantize=list(
                op_types
            ),  # never Attention: opset-23 Attention breaks if quantize_dynamic touches it
            per_channel=per_channel,
            nodes_to_exclude=exclude,
            use_external_data_format=external,  # writes <tmp>.data, the name exporters.onnx.data_file expects
            **_weight_args(weight_type),
            extra_options={
                "MatMulConstBOnly": True,  # only linear layers; q @ k^T has no constant operand
                "DefaultTensorType": onnx.TensorProto.FLOAT,  # ORT-fused graphs: else 'Unable to find data type for weight_name'
            },
        )
    if hidden:
        restore_tables(tmp, hidden, src_dir=named.parent, dst_data=data_file(tmp))
    out = _without_shape_hints(tmp)
    n = sum(1 for node in out.graph.node if node.op_type in _INT8_DYNAMIC_OPS)
    if "Gather" in op_types:  # quantized embedding tables: Gather reads int8 data, DequantizeLinear follows
        int8_inits = {
            t.name for t in out.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        }
        n += sum(1 for node in out.graph.node if node.op_type == "Gather" and node.input[0] in int8_inits)
    kept = sorted({node.op_type for node in out.graph.node if node.op_type in {"Add", *keep_fp32_ops}})
    notes = [
        f"dynamic int8 ({weight_type} weights, u8 activations, per_channel={per_channel}) on {sorted(op_types)} with constant weights"
    ]
    if chunked:
        notes.append(
            "embedding tables quantized chunk by chunk before ORT (per-tensor u8, as ORT's Gather path): "
            + ", ".join(f"{t.name} {'x'.join(map(str, t.shape))}" for t in chunked)
        )
    return n, kept, notes


class _AlreadyQuantizedFilter(logging.Filter):
    """Drops ORT's 'Please check if the model is already quantized' warning: the DequantizeLinear nodes it sees are
    the chunked embedding tables' (exporters.chunked_gather), written on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please check if the model is already quantized")


@contextlib.contextmanager
def _without_already_quantized_warning() -> Iterator[None]:
    root, flt = logging.getLogger(), _AlreadyQuantizedFilter()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


class _FeedsReader:
    """Adapter from an iterable of feeds dicts to ORT's ``CalibrationDataReader`` protocol."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _select_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the graph's inputs from ``feeds`` and cast them to the declared element type."""
    inits = {t.name for t in model.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if inp.name not in feeds:
            raise ValueError(f"calibration feeds lack model input {inp.name!r} (have {sorted(feeds)})")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        out[inp.name] = np.ascontiguousarray(np.asarray(feeds[inp.name]).astype(dtype, copy=False))
    return out


def _int8_static(
    src: Path,
    tmp: Path,
    feeds: list[dict[str, np.ndarray]],
    keep_fp32_ops: Sequence[str],
    per_channel: bool,
    op_types: Sequence[str],
    quantize_outputs: bool,
    tmp_dir: str,
    weight_type: str,
    external: bool = False,
    nodes_to_exclude: Sequence[str] = (),
) -> tuple[int, list[str], list[str]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    _name_nodes(model)
    named = Path(tmp_dir) / "named.onnx"
    consts = GraphIndex(model.graph).direct_constants
    save_onnx(model, named, external=external)
    # Only layers with a constant weight (input 1), e.g. the linear layers, never q @ k^T.
    targets = sorted(
        n.name
        for n in model.graph.node
        if n.op_type in set(op_types)
        and len(n.input) > 1
        and n.input[1] in consts
        and n.name not in set(nodes_to_exclude)
    )
    if not targets:
        logger.warning("int8-static: no MatMul/Gemm with constant weights in %s; nothing quantized", src)
    reader = _FeedsReader([_select_feeds(model, f) for f in feeds])
    quantize_static(
        str(named),
        str(tmp),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        nodes_to_quantize=targets,
        # every node but the targets: an empty nodes_to_quantize means "all" to ORT (q @ k^T included)
        nodes_to_exclude=sorted({n.name for n in model.graph.node} - set(targets)),
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,  # asymmetric u8 activations, s8 weights: ORT's CPU QDQ default
        **_weight_args(weight_type),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        extra_options={
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # (K, N) weight: scale per output column
            "DefaultTensorType": onnx.TensorProto.FLOAT,
            # Q/DQ on MatMul outputs rounds the values entering the bias/residual Add per-tensor.
            "OpTypesToExcludeOutputQuantization": [] if quantize_outputs else ["MatMul", "Gemm"],
        },
    )
    out = _without_shape_hints(tmp)
    producer = GraphIndex(out.graph).producer
    n = sum(
        1
        for node in out.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and len(node.input) > 1
        and (p := producer.get(node.input[1])) is not None
        and p.op_type == "DequantizeLinear"
    )
    kept = sorted({node.op_type for node in out.graph.node if node.op_type in {"Add", *keep_fp32_ops}})
    return (
        n,
        kept,
        [
            f"static QDQ int8 (u8 activations, {weight_type} weights, per_channel={per_channel}) on {len(targets)} nodes of "
            f"{sorted(op_types)}; outputs quantized: {quantize_outputs}; MinMax calibration on {len(feeds)} feeds"
        ],
    )
