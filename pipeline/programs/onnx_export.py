"""Export a compiled program as ONNX: a ``Loop`` over MatMul + Add + Relu with the halt test in the loop
condition, or the same step unrolled T times. fp32, or int8 (MatMulInteger with uint8 activations, int8 weights
and int32 biases — exact because every weight, bias and activation of the construction is a small integer).

Graph interface (both variants)::

    inputs : state (B, D) float32 — bits of the initial state (see StateLayout)
             max_steps ()  int64   — Loop variant only: the step budget T
    outputs: state (B, D) float32 — the state where the run stopped
             steps (B,)   int64   — state-changing steps executed
             halted (B,)  bool    — a fixed point was reached within the budget (steps < T)

Weight storage: a matrix whose nonzeros take less room than the dense matrix is an ONNX sparse initializer
(int64 linear indices + values). ONNX Runtime densifies it when the session starts, so the file (``.onnx`` and
``.ort`` alike) shrinks while the run still multiplies dense matrices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from exporters.precision_registry import precision_subset
from pipeline.errors import EdgepipeError
from pipeline.programs.circuit import LayeredNet
from pipeline.programs.compile import CompiledProgram

__all__ = [
    "OPSET",
    "PRECISIONS",
    "VARIANTS",
    "ExportResult",
    "Int8Check",
    "Int8MarginError",
    "build_onnx",
    "check_int8",
    "export_onnx",
]

OPSET = 17  # Loop, MatMulInteger, int32 Relu (14+), ReduceMax with an axes attribute (<= 17)
#: the registered precisions (exporters.precision_registry) a compiled program can ship in: its own exact builders, not
#: the generic converters (checked against the registry at import: a renamed precision fails loudly here)
PRECISIONS = precision_subset(("fp32", "int8"))
VARIANTS = ("loop", "unrolled")
UINT8_MAX = 255
INT8_MAX = 127


class Int8MarginError(EdgepipeError):
    """An int8 quantization that would not be bit-exact: refused (exit code 2)."""


@dataclass(frozen=True)
class Int8Check:
    """Result of :func:`check_int8`.

    Attributes:
        margin: 0.5 minus the largest pre-activation change that rounding the weights and biases to integers can
            cause (over every unit, with inputs at their worst-case bounds). > 0 means the int8 network computes
            exactly the integer pre-activations of the fp32 one; 0.5 means the weights were integers already.
        max_weight: largest |rounded weight| (must be <= 127 for int8).
        max_activation: largest upper bound of any activation (must be <= 255 for uint8).
        max_accumulator: largest |int32 accumulator| bound.
        problems: why the quantization is refused (empty when it is accepted).
    """

    margin: float
    max_weight: float
    max_activation: float
    max_accumulator: float
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_int8(net: LayeredNet) -> Int8Check:
    """Measure the int8 rounding margin of ``net`` (inputs are bits; interval bounds layer by layer).

    Weights and biases are rounded to integers (scale 1); activations are carried as uint8. Activation bounds are
    the interval bounds, tightened by the construction's proven unit bounds (``net.activation_bounds``). The check refuses
    when a rounded weight leaves int8, an activation bound leaves uint8, an accumulator bound leaves int32, or the
    rounding can move a pre-activation by 0.5 or more (margin <= 0).
    """
    import scipy.sparse as sp

    ub = np.ones(net.widths[0])  # every state entry is a bit
    worst_dev = 0.0
    max_w = max_act = max_acc = 0.0
    problems: list[str] = []
    for li, ((r, c, v), b, shp) in enumerate(zip(net.coo(), net.all_biases(), net.shapes()), 1):
        name = f"layer {li}" if li <= net.depth else "readout"
        wq = np.rint(v)
        bq = np.rint(b)
        dev = sp.csr_matrix((np.abs(v - wq), (r, c)), shape=shp) @ ub + np.abs(b - bq)
        worst_dev = max(worst_dev, float(dev.max(initial=0.0)))
        max_w = max(max_w, float(np.abs(wq).max(initial=0.0)))
        pos = sp.csr_matrix((np.maximum(wq, 0), (r, c)), shape=shp) @ ub
        neg = sp.csr_matrix((np.minimum(wq, 0), (r, c)), shape=shp) @ ub
        acc = np.maximum(np.abs(pos + bq), np.abs(neg + bq))
        max_acc = max(max_acc, float(acc.max(initial=0.0)))
        if li <= net.depth:
            ub = np.maximum(pos + bq, 0.0)
            if net.activation_bounds is not None:
                ub = np.minimum(ub, net.activation_bounds[li - 1])
            if ub.max(initial=0.0) > UINT8_MAX:
                problems.append(f"{name}: activation bound {ub.max():.0f} exceeds uint8 ({UINT8_MAX})")
            max_act = max(max_act, float(ub.max(initial=0.0)))
        if np.abs(wq).max(initial=0.0) > INT8_MAX:
            problems.append(f"{name}: weight {np.abs(wq).max():.0f} exceeds int8 ({INT8_MAX})")
    margin = 0.5 - worst_dev
    if margin <= 0:
        problems.append(f"rounding can move a pre-activation by {worst_dev:.3g} >= 0.5 (margin {margin:.3g})")
    if max_acc >= 2**31:
        problems.append(f"accumulator bound {max_acc:.3g} exceeds int32")
    return Int8Check(margin, max_w, max_act, max_acc, tuple(problems))


@dataclass(frozen=True)
class ExportResult:
    path: Path
    precision: str
    variant: str
    size_bytes: int
    sparse_matrices: int
    dense_matrices: int
    unroll_steps: int | None = None
    int8: Int8Check | None = None


def _weights(net: LayeredNet, precision: str, sparse: str, prefix: str = "W"):
    """Initializers (dense and sparse) of every matrix transposed to (in, out), for ``h @ W``, and the biases."""
    from onnx import helper, numpy_helper

    dtype = np.int8 if precision == "int8" else np.float32
    inits, sparse_inits, names = [], [], []
    for k, ((r, c, v), b, (out_f, in_f)) in enumerate(zip(net.coo(), net.all_biases(), net.shapes())):
        vals = (np.rint(v) if precision == "int8" else v).astype(dtype)
        flat = (c * out_f + r).astype(np.int64)  # (in, out) row-major position of W[r, c]
        keep = vals != 0
        flat, vals = flat[keep], vals[keep]
        order = np.argsort(flat, kind="stable")
        flat, vals = flat[order], vals[order]
        dense_bytes = in_f * out_f * np.dtype(dtype).itemsize
        sparse_bytes = len(flat) * (8 + np.dtype(dtype).itemsize)  # int64 linear indices + values
        name = f"{prefix}{k}"
        if sparse == "always" or (sparse == "auto" and sparse_bytes < dense_bytes):
            sparse_inits.append(
                helper.make_sparse_tensor(
                    numpy_helper.from_array(vals, name), numpy_helper.from_array(flat, f"{name}_indices"), [in_f, out_f]
                )
            )
        else:
            W = np.zeros(in_f * out_f, dtype)
            W[flat] = vals
            inits.append(numpy_helper.from_array(W.reshape(in_f, out_f), name))
        bias = np.rint(b).astype(np.int32) if precision == "int8" else b.astype(np.float32)
        inits.append(numpy_helper.from_array(bias, f"b{k}"))
        names.append((name, f"b{k}"))
    return inits, sparse_inits, names


def _step_nodes(names, precision: str, s_in: str, s_out: str, tag: str):
    """One loop iteration: hidden layers then the linear readout, ``s_in`` (B, D) float -> ``s_out``."""
    from onnx import TensorProto, helper

    nodes = []
    depth = len(names) - 1
    if precision == "int8":
        h = f"{tag}h0"
        nodes.append(helper.make_node("Cast", [s_in], [h], to=TensorProto.UINT8))
        for k, (w, b) in enumerate(names):
            nodes += [
                helper.make_node("MatMulInteger", [h, w], [f"{tag}acc{k}"]),
                helper.make_node("Add", [f"{tag}acc{k}", b], [f"{tag}pre{k}"]),
            ]
            if k < depth:
                nodes += [
                    helper.make_node("Relu", [f"{tag}pre{k}"], [f"{tag}act{k}"]),
                    helper.make_node("Cast", [f"{tag}act{k}"], [f"{tag}h{k + 1}"], to=TensorProto.UINT8),
                ]
                h = f"{tag}h{k + 1}"
            else:
                nodes.append(helper.make_node("Cast", [f"{tag}pre{k}"], [s_out], to=TensorProto.FLOAT))
    else:
        h = s_in
        for k, (w, b) in enumerate(names):
            nodes += [
                helper.make_node("MatMul", [h, w], [f"{tag}mm{k}"]),
                helper.make_node("Add", [f"{tag}mm{k}", b], [f"{tag}pre{k}" if k < depth else s_out]),
            ]
            if k < depth:
                nodes.append(helper.make_node("Relu", [f"{tag}pre{k}"], [f"{tag}h{k + 1}"]))
                h = f"{tag}h{k + 1}"
    return nodes


def _changed_nodes(s_old: str, s_new: str, changed: str, tag: str):
    """``changed`` (B,) bool: did this step change the sample's state."""
    from onnx import helper

    return [
        helper.make_node("Sub", [s_new, s_old], [f"{tag}d"]),
        helper.make_node("Abs", [f"{tag}d"], [f"{tag}ad"]),
        helper.make_node("ReduceMax", [f"{tag}ad"], [f"{tag}md"], axes=[1], keepdims=0),
        helper.make_node("Greater", [f"{tag}md", "zero_f"], [changed]),
    ]


def build_onnx(
    cp: CompiledProgram,
    *,
    precision: str = "fp32",
    variant: str = "loop",
    unroll_steps: int = 16,
    sparse: Literal["auto", "always", "never"] = "auto",
):
    """The ONNX model (``onnx.ModelProto``) and the number of sparse-stored matrices. See the module docstring."""
    from onnx import TensorProto, helper, numpy_helper

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if sparse not in ("auto", "always", "never"):
        raise ValueError(f"sparse must be auto, always or never, got {sparse!r}")
    D = cp.layout.size
    inits, sparse_inits, names = _weights(cp.net, precision, sparse)
    nodes = []
    inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array([1], np.int64), "one_1d"),
    ]
    state_in = helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", D])
    outputs = [
        helper.make_tensor_value_info("final_state", TensorProto.FLOAT, ["batch", D]),
        helper.make_tensor_value_info("steps", TensorProto.INT64, ["batch"]),
        helper.make_tensor_value_info("halted", TensorProto.BOOL, ["batch"]),
    ]
    # steps0: (B,) int64 zeros
    nodes += [
        helper.make_node("Shape", ["state"], ["state_shape"]),
        helper.make_node("Slice", ["state_shape", "axis0", "one_1d"], ["batch_1d"]),
        helper.make_node(
            "ConstantOfShape", ["batch_1d"], ["steps0"], value=numpy_helper.from_array(np.zeros(1, np.int64))
        ),
    ]
    inputs = [state_in]
    if variant == "loop":
        inputs.append(helper.make_tensor_value_info("max_steps", TensorProto.INT64, []))
        body_nodes = _step_nodes(names, precision, "s_in", "s_out", "")
        body_nodes += _changed_nodes("s_in", "s_out", "chg", "c_")
        body_nodes += [
            helper.make_node("Cast", ["chg"], ["chg_i"], to=TensorProto.INT64),
            helper.make_node("Add", ["n_in", "chg_i"], ["n_out"]),
            helper.make_node("ReduceMax", ["chg_i"], ["any_i"], keepdims=0),
            helper.make_node("Cast", ["any_i"], ["cond_out"], to=TensorProto.BOOL),
        ]
        body = helper.make_graph(
            body_nodes,
            "subleq_step",
            [
                helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("s_in", TensorProto.FLOAT, ["batch", D]),
                helper.make_tensor_value_info("n_in", TensorProto.INT64, ["batch"]),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["batch", D]),
                helper.make_tensor_value_info("n_out", TensorProto.INT64, ["batch"]),
            ],
        )
        inits.append(numpy_helper.from_array(np.array(True), "true"))
        nodes += [
            helper.make_node("Loop", ["max_steps", "true", "state", "steps0"], ["final_state", "steps"], body=body),
            helper.make_node("Less", ["steps", "max_steps"], ["halted"]),
        ]
    else:
        if unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
        s, n = "state", "steps0"
        for t in range(unroll_steps):
            s_next = "final_state" if t == unroll_steps - 1 else f"s{t + 1}"
            n_next = "steps" if t == unroll_steps - 1 else f"n{t + 1}"
            nodes += _step_nodes(names, precision, s, s_next, f"t{t}_")
            nodes += _changed_nodes(s, s_next, f"t{t}_chg", f"t{t}_c")
            nodes += [
                helper.make_node("Cast", [f"t{t}_chg"], [f"t{t}_chg_i"], to=TensorProto.INT64),
                helper.make_node("Add", [n, f"t{t}_chg_i"], [n_next]),
            ]
            s, n = s_next, n_next
        inits.append(numpy_helper.from_array(np.array(unroll_steps, np.int64), "budget"))
        nodes.append(helper.make_node("Less", ["steps", "budget"], ["halted"]))
    graph = helper.make_graph(
        nodes,
        f"subleq_{cp.construction}_{variant}_{precision}",
        inputs,
        outputs,
        inits,
        sparse_initializer=sparse_inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgepipe.programs")
    model.ir_version = 8
    spec = cp.spec
    for key, value in {
        "edgepipe.kind": "subleq",
        "word_bits": spec.word_bits,
        "memory_cells": spec.memory_cells,
        "program_slots": spec.program_slots,
        "construction": cp.construction,
        "program_in": cp.layout.program_in,
        "depth": cp.net.depth,
        "precision": precision,
        "variant": variant,
    }.items():
        model.metadata_props.add(key=key, value=str(value))
    return model, len(sparse_inits)


def export_onnx(
    cp: CompiledProgram,
    path: Path,
    *,
    precision: str = "fp32",
    variant: str = "loop",
    unroll_steps: int = 16,
    sparse: Literal["auto", "always", "never"] = "auto",
) -> ExportResult:
    """Write the ONNX model to ``path`` atomically (checked with ``onnx.checker``).

    Raises:
        Int8MarginError: ``precision="int8"`` and :func:`check_int8` refuses the quantization.
    """
    import os
    import tempfile

    import onnx

    check = None
    if precision == "int8":
        check = check_int8(cp.net)
        if not check.ok:
            raise Int8MarginError(f"int8 refused for this program: {'; '.join(check.problems)}")
    model, n_sparse = build_onnx(cp, precision=precision, variant=variant, unroll_steps=unroll_steps, sparse=sparse)
    # onnx's shape inference types sparse initializers as sparse tensors, which no op accepts, although runtimes
    # (ONNX Runtime) densify them at load: the full check (with inference) only where there are none
    onnx.checker.check_model(model, full_check=n_sparse == 0)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        os.replace(tmp, path)  # replaces a symlink itself, never writes through it
    finally:
        Path(tmp).unlink(missing_ok=True)
    n_mats = cp.net.depth + 1
    return ExportResult(
        path,
        precision,
        variant,
        path.stat().st_size,
        n_sparse,
        n_mats - n_sparse,
        unroll_steps if variant == "unrolled" else None,
        check,
    )
