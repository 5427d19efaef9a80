"""Memory-lean int8 embedding tables: large ``Gather`` tables quantized chunk by chunk before ORT's dynamic quantizer.

ONNX Runtime's ``quantize_dynamic`` quantizes a Gather's constant table *per tensor, as an activation*
(``onnxruntime/quantization/operators/gather.py`` ``GatherQuant`` -> ``ONNXQuantizer.quantize_activation`` ->
``BaseQuantizer.quantize_initializer_impl`` -> ``quant_utils.quantize_data``): asymmetric u8 over the table's
``[min(x, 0), max(x, 0)]``, whatever the weight type, ``reduce_range`` or ``per_channel`` (those apply to MatMul/Gemm
weights only). It holds the whole table as float plus several full-size float temporaries (``/ scale``, ``round``,
``+ zero_point``, ``clip``) on top of the loaded model and ORT's own model copies: the 250002 x 2304 table of issue 11
(2.3 GB) took the quantize stage to 13.4 GiB.

:func:`prequantize_gather_tables` writes the same result itself before ORT runs, reading the float table in
row chunks (from the external-data file, never loading it into the ModelProto; or from the inline bytes, which it
releases from the proto first) and writing ORT's graph form::

    <T>_quantized (u8, table shape), <T>_scale (float, scalar), <T>_zero_point (u8, scalar)
    Gather(<T>_quantized, ids) -> <out>_quantized -> DequantizeLinear(<T>_scale, <T>_zero_point) -> <out>

ORT then sees a u8 table (not a float weight) and leaves that Gather alone; :func:`hide_tables` even keeps the u8
tables out of ORT's model copies (as graph inputs) and :func:`restore_tables` puts them back into its output. The scale, zero point and quantized
values come from ORT's own functions (``quant_utils.compute_data_quant_params`` with the chunked min/max,
``quant_utils.quantize_nparray`` per chunk: element-wise, so chunking cannot change a value), hence bit-identical to
ORT's output (tests/exporters/test_chunked_gather.py checks tables, scales, zero points, nodes and outputs against
``quantize_dynamic`` itself).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.precision_registry import DEFAULT_CHUNKED_GATHER_BYTES

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CHUNKED_GATHER_BYTES",
    "ChunkedTable",
    "gather_tables",
    "hide_tables",
    "prequantize_gather_tables",
    "restore_tables",
]

#: fp32 bytes of table rows read and quantized at a time (a few temporaries of this size live at once).
CHUNK_BYTES = 16 * 2**20
#: ORT's suffix for quantized tensors (``onnxruntime.quantization.quant_utils.TENSOR_NAME_QUANT_SUFFIX``).
_Q = "_quantized"


@dataclass(frozen=True)
class ChunkedTable:
    """One table quantized here: its name, shape (rows, ...) and ORT's scale and zero point."""

    name: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int


def gather_tables(
    model: onnx.ModelProto, *, op_types: Sequence[str], excluded: Sequence[str], min_bytes: int | None
) -> list[TensorProto]:
    """The fp32 initializers of ``model`` that ORT's dynamic quantizer would quantize as Gather tables and that this
    module takes over: at least ``min_bytes`` of fp32, rank >= 1, every use a Gather's data input (input 0) by a node
    named neither in ``excluded`` nor left out of ``op_types``, and no Gather output read by a node of ``op_types``
    (ORT would feed such a node the u8 values directly instead of dequantizing first: not the graph written here).
    Tables that are also graph inputs or outputs stay ORT's.

    Node names must be set (``exporters.quantize._name_nodes``). Returns the initializers in graph order; none when
    ``min_bytes`` is None.
    """
    if "Gather" not in op_types or min_bytes is None:
        return []
    skip, quantized_ops = set(excluded), set(op_types) - {"Gather"}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    readers: dict[str, set[str]] = {}  # tensor -> op types reading it
    graph_io = {v.name for v in [*model.graph.input, *model.graph.output]}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
            readers.setdefault(name, set()).add(node.op_type)
    chosen = []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT or not init.dims or init.name in graph_io:
            continue
        if math.prod(init.dims) * 4 < min_bytes:
            continue
        use = uses.get(init.name, [])
        if not use or any(n.op_type != "Gather" or i != 0 or n.name in skip for n, i in use):
            continue
        if any(readers.get(n.output[0], set()) & quantized_ops for n, _ in use):
            continue
        chosen.append(init)
    return chosen


def _external_range(init: TensorProto, src_data: Path, size: int) -> tuple[int, int]:
    """(offset, length) of ``init``'s bytes in ``src_data``; ValueError if they are not a valid range of that file."""
    info = {e.key: e.value for e in init.external_data}
    if info.get("location") != src_data.name:
        raise ValueError(
            f"initializer {init.name!r} keeps its data in {info.get('location')!r}, not in {src_data.name!r}"
        )
    offset = int(info.get("offset", 0))
    length = int(info.get("length", size - offset))
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"initializer {init.name!r}: bytes {offset}..{offset + length} lie outside {src_data.name}")
    return offset, length


def _row_chunks(read, rows: int, row_elems: int, chunk_bytes: int) -> Iterator[np.ndarray]:
    """``read(r0, r1)`` for consecutive row ranges of about ``chunk_bytes`` of fp32, each a (r1 - r0) * row_elems
    float32 vector."""
    step = max(1, chunk_bytes // max(1, 4 * row_elems))
    for r0 in range(0, rows, step):
        yield read(r0, min(rows, r0 + step))


def _table_reader(init: TensorProto, src_data: Path | None, inline: bytes | None):
    """A ``read(r0, r1)`` over ``init``'s rows: file reads at offsets (no memory map, whose touched pages would stay
    resident) for external data, a view of ``inline`` otherwise."""
    rows, row_elems = init.dims[0], math.prod(init.dims[1:])
    if inline is not None:
        if len(inline) != rows * row_elems * 4:
            raise ValueError(f"initializer {init.name!r}: {len(inline)} bytes, its shape needs {rows * row_elems * 4}")
        flat = np.frombuffer(inline, dtype="<f4")

        def read(r0: int, r1: int) -> np.ndarray:
            return flat[r0 * row_elems : r1 * row_elems]

        return read
    assert src_data is not None
    offset, length = _external_range(init, src_data, src_data.stat().st_size)
    if length != rows * row_elems * 4:
        raise ValueError(
            f"initializer {init.name!r}: {length} bytes in {src_data.name}, its shape needs {rows * row_elems * 4}"
        )

    def read_file(r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0) * row_elems, dtype="<f4")
        with open(src_data, "rb") as f:
            f.seek(offset + r0 * row_elems * 4)
            if f.readinto(out.data.cast("B")) != out.nbytes:
                raise ValueError(f"initializer {init.name!r}: {src_data.name} ends inside its data")
        return out

    return read_file


def _quantize_table(read, init: TensorProto, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray, Iterator[np.ndarray]]:
    """ORT's per-tensor u8 activation quantization of the table ``read`` gives: (scale, zero_point, u8 row chunks).

    Pass 1 takes min/max chunk by chunk; pass 2 (the returned iterator) quantizes each chunk with
    ``quantize_nparray``, ORT's element-wise formula ``clip(round(x / scale) + zero_point, 0, 255)``.
    ValueError if the table holds a non-finite value.
    """
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    rows, row_elems = init.dims[0], math.prod(init.dims[1:])
    rmin, rmax = np.float32(np.inf), np.float32(-np.inf)
    for chunk in _row_chunks(read, rows, row_elems, chunk_bytes):
        if chunk.size:
            rmin, rmax = min(rmin, chunk.min()), max(rmax, chunk.max())
    if not (np.isfinite(rmin) and np.isfinite(rmax)):
        raise ValueError(f"embedding table {init.name!r} holds non-finite values (min {rmin}, max {rmax})")
    # ORT's own parameters from the table's range: with both overrides, `data` only supplies the dtype and emptiness
    zero_point, scale = compute_data_quant_params(
        np.zeros(1, dtype=np.float32), TensorProto.UINT8, symmetric=False, reduce_range=False,
        rmin_override=rmin, rmax_override=rmax,
    )  # fmt: skip

    def quantized() -> Iterator[np.ndarray]:
        for chunk in _row_chunks(read, rows, row_elems, chunk_bytes):
            yield quantize_nparray(TensorProto.UINT8, chunk, scale, zero_point)

    return scale, zero_point, quantized()


def _rewire(model: onnx.ModelProto, table: str, scale: np.ndarray, zero_point: np.ndarray) -> None:
    """Point every Gather of ``table`` at ``<table>_quantized`` and dequantize its output right after it (ORT's
    names: output ``<out>_quantized``, node ``<out>_DequantizeLinear``); add the scale and zero-point initializers
    as ORT writes them (``make_tensor`` scalars)."""
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type == "Gather" and node.input[0] == table:
            out = node.output[0]
            node.input[0], node.output[0] = table + _Q, out + _Q
            dq = helper.make_node(
                "DequantizeLinear",
                [out + _Q, table + "_scale", table + "_zero_point"],
                [out],
                out + "_DequantizeLinear",
            )
            nodes.append(dq)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(
        [
            helper.make_tensor(table + "_scale", TensorProto.FLOAT, [], scale.reshape(-1).tolist()),
            helper.make_tensor(table + "_zero_point", TensorProto.UINT8, [], zero_point.reshape(-1).tolist()),
        ]
    )


def _external_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)


def _copy_range(src, dst, offset: int, length: int, buf: bytearray) -> None:
    src.seek(offset)
    view = memoryview(buf)
    while length:
        n = src.readinto(view[: min(length, len(buf))])
        if not n:
            raise ValueError(f"{Path(src.name).name} ends inside an initializer's data")
        dst.write(view[:n])
        length -= n


def prequantize_gather_tables(
    model: onnx.ModelProto,
    *,
    src_data: Path | None,
    dst_data: Path | None,
    op_types: Sequence[str],
    excluded: Sequence[str],
    min_bytes: int | None = DEFAULT_CHUNKED_GATHER_BYTES,
    chunk_bytes: int | None = None,
) -> list[ChunkedTable]:
    """Quantize ``model``'s large Gather tables (:func:`gather_tables`) in place, as ORT's dynamic quantizer would.

    Args:
        model: the graph, node names set; with external data it is loaded with ``load_external_data=False``.
        src_data: the model's external-data file (``exporters.onnx.data_file``), or None for an inline model.
        dst_data: with ``src_data``: the data file to write for the rewritten graph (every external tensor is copied
            there, the quantized tables take the float tables' place). The graph must then be saved beside it, under
            the name whose data file it is. None for an inline model.
        op_types / excluded: ``quantize_dynamic``'s ``op_types_to_quantize`` and ``nodes_to_exclude``.
        min_bytes: fp32 size from which a table is taken over (default
            :data:`exporters.precision_registry.DEFAULT_CHUNKED_GATHER_BYTES`); None = none (external data is
            still copied to ``dst_data``).
        chunk_bytes: fp32 bytes of rows quantized at a time (default :data:`CHUNK_BYTES`).

    Returns:
        One :class:`ChunkedTable` per table quantized. Peak memory beyond the graph: a few ``chunk_bytes``
        temporaries (external data), or the table's bytes once (inline: released from the proto first) plus its
        u8 result.

    Raises:
        ValueError: a table with non-finite values, or external data that does not lie in ``src_data``.
    """
    tables = gather_tables(model, op_types=op_types, excluded=excluded, min_bytes=min_bytes)
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if src_data is None:
        return [t for t in (_quantize_one(model, init, None, None, chunk_bytes) for init in tables) if t is not None]
    assert dst_data is not None
    size = src_data.stat().st_size
    table_names = {t.name for t in tables}
    buf = bytearray(min(chunk_bytes, 64 * 2**20))
    with open(src_data, "rb") as src, open(dst_data, "xb") as dst:
        for t in _external_tensors(model):  # everything else: copied range by range, offsets renumbered
            if t.name in table_names:
                continue
            offset, length = _external_range(t, src_data, size)
            start = dst.tell()
            _copy_range(src, dst, offset, length, buf)
            _set_external(t, dst_data.name, start, length)
        done = [_quantize_one(model, init, src_data, dst, chunk_bytes) for init in tables]
    return [t for t in done if t is not None]


def _quantize_one(
    model: onnx.ModelProto, init: TensorProto, src_data: Path | None, dst, chunk_bytes: int
) -> ChunkedTable | None:
    """Quantize table ``init`` of ``model`` (read from ``src_data`` when external; written to the open data file
    ``dst`` when given, else inline) and rewire its Gathers. None if its floats are not raw bytes (``float_data``)."""
    name, dims = init.name, tuple(init.dims)
    if init.data_location == TensorProto.EXTERNAL:
        read = _table_reader(init, src_data, None)
    elif init.HasField("raw_data"):
        inline = init.raw_data
        init.ClearField("raw_data")  # the bytes object above is now the only float copy
        read = _table_reader(init, None, inline)
        del inline  # held by `read` alone, released with it below
    else:  # float_data: already unpacked on the Python side, and no size this path is for
        return None
    scale, zp, chunks = _quantize_table(read, init, chunk_bytes)
    if dst is not None:  # (rows * row_elems,) u8 appended to the data file chunk by chunk
        start = dst.tell()
        for c in chunks:
            dst.write(c.tobytes())
        q = TensorProto(name=name + _Q, data_type=TensorProto.UINT8, dims=dims)
        _set_external(q, Path(dst.name).name, start, dst.tell() - start)
    else:
        flat = np.empty(math.prod(dims), dtype=np.uint8)  # (rows * row_elems,) filled chunk by chunk
        pos = 0
        for c in chunks:
            flat[pos : pos + c.size] = c
            pos += c.size
        q = onnx.numpy_helper.from_array(flat.reshape(dims), name + _Q)
    del read, chunks  # the float table's bytes (inline) go before the u8 copy goes into the graph
    _replace(model, name, q)
    _rewire(model, name, scale, zp)
    return ChunkedTable(name, dims, float(scale), int(zp))


def _replace(model: onnx.ModelProto, old: str, new: TensorProto) -> None:
    """Put ``new`` in the place of the float initializer named ``old``."""
    inits = model.graph.initializer
    inits[next(k for k, t in enumerate(inits) if t.name == old)].CopyFrom(new)


def hide_tables(model: onnx.ModelProto, tables: Sequence[ChunkedTable]) -> list[TensorProto]:
    """Take the quantized tables out of ``model``'s initializers and declare each as a u8 graph input instead.

    Why: ORT's quantizer still copies every initializer it loads about three times (it reloads the model with shape
    inference, keeps the loaded copy and saves through another); as graph inputs the tables cost it nothing, and
    ORT treats a Gather of a graph input as not quantizable, as it treats a u8 table. Returns the removed
    initializers (external ones hold only their location) for :func:`restore_tables`.
    """
    names = {t.name + _Q for t in tables}
    inits, hidden = model.graph.initializer, []
    for i in reversed(range(len(inits))):  # only the tables are copied out; the other weights stay where they are
        if inits[i].name in names:
            hidden.append(TensorProto())
            hidden[-1].CopyFrom(inits[i])
            del inits[i]
    hidden.reverse()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in hidden)
    return hidden


def restore_tables(
    path: Path, hidden: Sequence[TensorProto], *, src_dir: Path, dst_data: Path, chunk_bytes: int | None = None
) -> None:
    """Put :func:`hide_tables`' initializers back into the model ORT wrote at ``path`` and drop their graph inputs.

    External tables are copied range by range from their data file in ``src_dir`` to the end of ``dst_data``
    (``path``'s data file, created if ORT wrote none), so no table is held in memory; inline ones go in as they are.
    """
    model = onnx.load(str(path), load_external_data=False)
    names = {t.name for t in hidden}
    inputs = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    external = [t for t in hidden if t.data_location == TensorProto.EXTERNAL]
    if external:
        buf = bytearray(chunk_bytes or CHUNK_BYTES)
        with open(dst_data, "ab") as dst:
            for t in external:
                src_data = src_dir / {e.key: e.value for e in t.external_data}["location"]
                offset, length = _external_range(t, src_data, src_data.stat().st_size)
                start = dst.tell()
                with open(src_data, "rb") as src:
                    _copy_range(src, dst, offset, length, buf)
                _set_external(t, dst_data.name, start, length)
    model.graph.initializer.extend(hidden)
    onnx.save_model(model, str(path))
