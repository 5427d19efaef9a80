"""Fixed-shape models for targets that cannot take dynamic shapes (NPUs: Qualcomm HTP via QNN, NNAPI, CoreML).

:func:`make_static` fixes every token input of an exported model to ``(batch, seq)`` with ONNX Runtime's own
tool (``onnxruntime.tools.onnx_model_utils.make_input_shape_fixed``, what ``python -m
onnxruntime.tools.make_dynamic_shape_fixed`` runs), drops the stale symbolic shapes of outputs and
intermediate values, and re-infers them all with ONNX Runtime's symbolic shape inference, which folds the
``Shape -> Gather -> Reshape`` chains an exporter leaves. The result is checked: :func:`dynamic_dims` must
find no symbolic or unknown dim in the graph inputs, outputs, ``value_info`` or any node output.

:func:`fit_feeds` pads/truncates tokenized ``(B, S)`` feeds to the fixed shape for validation and bundles,
and gives the validity mask that keeps padded rows and positions out of every comparison.

KV-cache decoders are refused (:class:`StaticShapeError`): a fixed-shape KV cache needs two graphs (a prefill
at ``seq`` and a one-token decode step with the past fixed at the context length), and edgepipe exports one
graph per target. A decoder exported without a cache (``export: {with_past: false}``) is fixed like an
encoder: a full-sequence model at ``(batch, seq)``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

__all__ = [
    "TOKEN_INPUTS",
    "StaticShapeError",
    "dynamic_dims",
    "fit_feeds",
    "make_static",
]

#: inputs shaped (batch, sequence) that a fixed-shape model takes
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class StaticShapeError(ValueError):
    """The model cannot be given fixed shapes (an input edgepipe cannot fix, or a dim left dynamic)."""


def _tensor_dims(kind: str, vi: onnx.ValueInfoProto) -> list[str]:
    t = vi.type
    if not t.HasField("tensor_type"):
        return []
    if not t.tensor_type.HasField("shape"):
        return [f"{kind} '{vi.name}': unknown rank"]
    return [
        f"{kind} '{vi.name}'[{i}]={d.dim_param or '?'}"
        for i, d in enumerate(t.tensor_type.shape.dim)
        if not d.HasField("dim_value")
    ]


def dynamic_dims(model: onnx.ModelProto, *, node_outputs: bool = True) -> list[str]:
    """Every dim that is not a fixed number, as ``"<kind> '<name>'[<axis>]=<dim_param or ?>"``.

    Walks the graph inputs (initializers excluded), outputs and ``value_info``; with ``node_outputs`` also
    reports node outputs that have no shape recorded at all (``"node output '<name>': no shape"``), so a
    model that merely lacks ``value_info`` does not look static. Subgraphs (If/Loop bodies) are not walked.
    """
    g = model.graph
    inits = {t.name for t in g.initializer}
    out: list[str] = []
    for vi in g.input:
        if vi.name not in inits:
            out += _tensor_dims("input", vi)
    for vi in g.output:
        out += _tensor_dims("output", vi)
    for vi in g.value_info:
        out += _tensor_dims("value_info", vi)
    if node_outputs:
        known = {vi.name for vi in (*g.value_info, *g.output, *g.input)} | inits
        out += [
            f"node output '{o}': no shape"
            for n in g.node
            for o in n.output
            if o and o not in known and n.op_type != "Constant"
        ]
    return out


def _fixed(model: onnx.ModelProto, batch: int, seq: int) -> onnx.ModelProto:
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name not in TOKEN_INPUTS:
            reason = (
                "a fixed-shape KV cache needs separate prefill and decode graphs, which edgepipe does not build;"
                " export the decoder without it (export: {with_past: false})"
                if vi.name.startswith("past_key_values")
                else f"only the (batch, sequence) inputs {', '.join(TOKEN_INPUTS)} can be fixed"
            )
            raise StaticShapeError(f"input '{vi.name}' cannot get a static shape: {reason}")
        make_input_shape_fixed(model.graph, vi.name, [batch, seq])
    # the exporter's symbolic shapes of everything downstream are stale now: infer them again from the inputs
    del model.graph.value_info[:]
    for vi in model.graph.output:
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()
    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
    except Exception as exc:  # the tool raises bare Exceptions on ops it cannot infer
        raise StaticShapeError(f"shape inference at batch {batch}, sequence {seq} failed: {exc}") from None


def make_static(src: Path, dst: Path, *, batch: int, seq: int) -> Path:
    """Write ``src`` with every dim fixed to ``dst`` (may be ``src``: replaced atomically, external data kept).

    Args:
        src: an exported or quantized model whose inputs are a subset of :data:`TOKEN_INPUTS`, each (B, S).
        dst: where to write the fixed-shape model.
        batch: fixed batch size B.
        seq: fixed sequence length S in tokens.

    Returns:
        ``dst``.

    Raises:
        StaticShapeError: an input other than the token inputs (a KV cache), or a dim still dynamic after
            shape inference (the list of the first few).
    """
    from exporters.onnx import data_file, move_onnx, save_onnx

    src, dst = Path(src), Path(dst)
    external = data_file(src).is_file()
    model = _fixed(onnx.load(str(src)), batch, seq)
    left = dynamic_dims(model)
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        raise StaticShapeError(f"dims left dynamic at batch {batch}, sequence {seq}: {', '.join(left[:5])}{more}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".static-") as tmp:
        save_onnx(model, Path(tmp) / dst.name, external=external)
        move_onnx(Path(tmp) / dst.name, dst)
    return dst


def fit_feeds(
    feeds: Mapping[str, np.ndarray], batch: int, seq: int, *, mask_name: str = "attention_mask"
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Cut tokenized feeds into chunks of exactly ``(batch, seq)``.

    The sequence axis is truncated to ``seq`` or right-padded with zeros (mask 0: padding is ignored by
    the model and by every comparison). The batch axis is split into chunks of ``batch`` rows; the last chunk
    is filled with copies of its last real row (a real input, so no fully masked row can produce NaN), marked
    invalid in the validity mask.

    Args:
        feeds: ``name -> (B, S)`` arrays (the :data:`TOKEN_INPUTS` a model takes).
        batch: fixed batch size.
        seq: fixed sequence length.
        mask_name: the attention mask among ``feeds`` (validity starts from it).

    Returns:
        ``[(chunk feeds, valid)]`` with ``valid`` an int64 (batch, seq) array: 1 on real, unpadded tokens.

    Raises:
        StaticShapeError: a feed that is not (B, S) like the others.
    """
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    first = next(iter(arrays.values()))
    b, s = first.shape[:2] if first.ndim == 2 else (None, None)
    for k, v in arrays.items():
        if v.ndim != 2 or v.shape != (b, s):
            raise StaticShapeError(f"feed '{k}' has shape {v.shape}; static shapes need (batch, sequence) inputs")
    mask = arrays.get(mask_name, np.ones((b, s), dtype=np.int64))
    chunks = []
    for start in range(0, b, batch):
        rows = list(range(start, min(start + batch, b)))
        real = len(rows)
        rows += [rows[-1]] * (batch - real)  # (batch,): filler rows repeat the last real one
        keep = min(s, seq)

        def fit(a: np.ndarray, rows=rows, keep=keep) -> np.ndarray:
            out = np.zeros((batch, seq), dtype=a.dtype)  # (batch, seq): zeros = padding
            out[:, :keep] = a[rows, :keep]
            return out

        chunk = {k: fit(v) for k, v in arrays.items()}
        valid = fit(mask).astype(np.int64)
        valid[real:] = 0  # filler rows are not compared
        chunks.append((chunk, valid))
    return chunks
