"""Export a :class:`~pipeline.models.LoadedModel` to an ONNX model (``model.onnx``; weights over
:data:`EXTERNAL_DATA_THRESHOLD` in ``model.onnx.data`` beside it).

Two exporters, registered here in the exporter registry (:mod:`exporters.registry`; a new one is one file plus
one registration):

* ``"dynamo"`` (default): ``torch.onnx.export(..., dynamo=True)`` on a thin
  wrapper module with flat tensor inputs/outputs. Decoders with KV cache use a
  wrapper that rebuilds a ``transformers.DynamicCache`` from flat
  ``past_key_values.{i}.key/value`` tensors and returns flat ``present.{i}.*``
  tensors (transformers' decoders take the cache object, not tuples). The attention-mask length gets its own ``Dim``
  because ``Dim(seq) + Dim(past)`` is rejected by ``torch.export``.
* ``"optimum"``: ``optimum.exporters.onnx.main_export`` (cross-check/fallback;
  TorchScript tracer inside). Its names are used as-is.

IO naming follows optimum: inputs ``input_ids``, ``attention_mask``
(+ ``token_type_ids``, ``position_ids``, ``past_key_values.{i}.key/value``),
outputs ``last_hidden_state`` / ``logits`` (+ ``present.{i}.key/value``).
Every input/output has dynamic batch and sequence axes.

Exports are atomic (temp file in ``out_dir`` then ``os.replace``), checked with
``onnx.checker.check_model(full_check=True)``, and byte-deterministic. The raw
dynamo output is not: each node carries ``pkg.torch.onnx.stack_trace``
metadata quoting ``File "<eval_with_key>.N"``, where N is a process-global
counter of generated FX modules, so a second export in the same process
differs. A post-pass (:func:`_normalize`) drops node/graph/model metadata,
doc strings and the producer version, and renames intermediate values and
nodes by topological index (defensive: names are stable today).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.registry import exporter_spec, register_exporter

if TYPE_CHECKING:
    import onnx
    import torch
    from onnxscript import ir

    from pipeline.models import LoadedModel

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "PARITY_ATOL",
    "ExportError",
    "ExportResult",
    "data_file",
    "dummy_feeds",
    "export_onnx",
    "model_bytes",
    "move_onnx",
    "onnx_files",
    "save_onnx",
    "torch_reference",
]

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
# fp32 ORT-vs-PyTorch parity bound for an un-optimised export (measured diffs are 1e-7..4e-6).
PARITY_ATOL = 1e-4
# Example sizes traced by the dynamo exporter; all > 1 so no axis is specialised to 0/1.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 5, 3


#: Weights above this many bytes go to ``<model>.data`` beside the graph (ONNX external data): one protobuf
#: message cannot exceed 2 GiB, so a single-file export of a Llama-1B-class model fails to serialize.
EXTERNAL_DATA_THRESHOLD = 1800 * 2**20


def data_file(path: Path) -> Path:
    """The external-data file that belongs to ``path`` (``model.onnx`` -> ``model.onnx.data``)."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def onnx_files(path: Path) -> list[Path]:
    """``path`` and, if the model keeps its weights outside, its data file."""
    path = Path(path)
    return [path] + ([data_file(path)] if data_file(path).is_file() else [])


def model_bytes(path: Path) -> int:
    """Bytes on disk of a model, its external data included."""
    return sum(f.stat().st_size for f in onnx_files(path))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializer data (what decides the 2 GiB protobuf limit), from dims and element type.

    Not ``TensorProto.ByteSize()``: protobuf refuses to size a single message over 2 GiB (``EncodeError: Failed to
    serialize proto``), which a 250k x 2304 fp32 embedding table is.
    """
    import onnx

    def nbytes(t: onnx.TensorProto) -> int:
        if t.data_type == onnx.TensorProto.STRING:
            return sum(len(s) for s in t.string_data)
        return math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    return sum(nbytes(t) for t in model.graph.initializer)


def save_onnx(
    model: onnx.ModelProto, path: Path, *, external: bool | None = None, threshold: int = EXTERNAL_DATA_THRESHOLD
) -> bool:
    """Write ``model`` to ``path``; weights go to ``path``'s data file when ``external`` (``None``: when they exceed
    ``threshold`` bytes). A stale data file of an earlier single-file save is removed. Returns ``external``.

    Not atomic by itself: callers write into a temporary folder and move :func:`onnx_files` into place.
    """
    import onnx

    path = Path(path)
    if external is None:
        external = tensor_bytes(model) > threshold
    data = data_file(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(path), save_as_external_data=False)
    return external


def move_onnx(src: Path, dst: Path) -> None:
    """Move a model and its data file (data first, so ``dst`` never names missing weights); a stale data file at
    ``dst`` from an earlier external-data save is removed."""
    src, dst = Path(src), Path(dst)
    if data_file(src).is_file():
        if data_file(src).name != data_file(dst).name:
            raise ValueError(
                f"cannot rename {src.name} to {dst.name}: its external data is named {data_file(src).name}"
            )
        os.replace(data_file(src), data_file(dst))
    else:
        data_file(dst).unlink(missing_ok=True)
    os.replace(src, dst)


class ExportError(Exception):
    """An ONNX export failed; one line naming model type, exporter and cause."""


@dataclass(frozen=True)
class ExportResult:
    """What was exported and how to feed it.

    Attributes:
        path: ``model.onnx`` (weights embedded, or in ``model.onnx.data`` beside it: :func:`onnx_files`).
        task: the task the graph computes (``feature-extraction``, ``fill-mask``, ``text-generation``).
        input_names / output_names: graph IO names, in graph order.
        with_past: decoders only: KV-cache inputs/outputs are present.
        num_layers, num_kv_heads, head_dim: decoder cache geometry for building
            empty past feeds of shape ``(batch, num_kv_heads, past, head_dim)``; 0 for encoders.
        exporter: the registered exporter that made it (:mod:`exporters.registry`).
        opset: default-domain opset of the file.
        vocab_size: ``config.vocab_size`` (upper bound for dummy token ids).
    """

    path: Path
    task: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    with_past: bool
    num_layers: int
    num_kv_heads: int
    head_dim: int
    exporter: str
    opset: int
    vocab_size: int = 0

    @property
    def is_causal_lm(self) -> bool:
        """Exported from a causal LM (decided by :attr:`LoadedModel.is_causal_lm`): logits and a cache geometry."""
        return self.num_layers > 0

    @property
    def past_names(self) -> tuple[str, ...]:
        """The ``past_key_values.*`` input names, in layer order."""
        return tuple(n for n in self.input_names if n.startswith("past_key_values."))


# --------------------------------------------------------------------------- wrappers


def _cache_geometry(loaded: LoadedModel) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder, read from the modules themselves.

    The geometry is what one cached forward step returns, not what ``config`` says: structured
    pruning through ``prune_heads`` (GPT-2) leaves ``config.n_head`` at the dense value while each
    layer keeps fewer heads, and a config can carry an explicit ``head_dim`` different from
    ``hidden_size // num_attention_heads``. Layers must agree (one cache shape per graph).

    Raises:
        ExportError: layers with different cache shapes.
    """
    import torch

    model = loaded.model
    with torch.inference_mode():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True, return_dict=True)
    cache = out.past_key_values
    legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
    shapes = {(int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3])) for k, v in legacy}
    if len(shapes) != 1:
        raise ExportError(
            f"{loaded.model_type}: layers have different KV-cache shapes {sorted(shapes)} (heads, head_dim per key/value);"
            " one cache shape per graph is supported"
        )
    ((kh, kd, vh, vd),) = shapes
    if (kh, kd) != (vh, vd):
        raise ExportError(
            f"{loaded.model_type}: key cache ({kh} heads x {kd}) and value cache ({vh} x {vd}) differ in shape"
        )
    return len(legacy), kh, kd


def _has_token_type_ids(loaded: LoadedModel) -> bool:
    """Whether the encoder graph takes ``token_type_ids``.

    The model's ``forward`` must accept it (DistilBERT/MPNet do not); then the
    tokenizer decides (BERT emits it, RoBERTa's tokenizer does not), and
    without a tokenizer the config's ``type_vocab_size`` does.
    """
    import inspect

    if loaded.is_decoder:  # GPT-2/Llama bodies: ids and mask only
        return False
    if "token_type_ids" not in inspect.signature(loaded.model.forward).parameters:
        return False
    if loaded.tokenizer is not None:
        return "token_type_ids" in loaded.tokenizer.model_input_names
    return int(getattr(loaded.model.config, "type_vocab_size", 0) or 0) > 0


def _encoder_wrapper(loaded: LoadedModel) -> torch.nn.Module:
    import inspect

    import torch

    output = "logits" if loaded.task == "fill-mask" else "last_hidden_state"
    # decoder bodies (a bare LlamaModel / GPT2Model for feature-extraction) get explicit positions
    positions = loaded.is_decoder and "position_ids" in inspect.signature(loaded.model.forward).parameters

    class EncoderWrapper(torch.nn.Module):
        """Flat tensors in, one tensor out: ``(B, S)`` ids/mask -> ``(B, S, H)`` or ``(B, S, V)``."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            if positions:
                # (B, S) positions 0..S-1, as the model's default but per row: a (1, S) default makes the
                # RoPE cos/sin caches (1, S, D/2), which ORT's RotaryEmbedding rejects for batch > 1
                kw["position_ids"] = torch.ones_like(input_ids).cumsum(1) - 1
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kw)
            return out[output]

    return EncoderWrapper(loaded.model)


def _decoder_wrapper(loaded: LoadedModel, with_past: bool) -> torch.nn.Module:
    import torch
    from transformers import DynamicCache

    n_layers = _cache_geometry(loaded)[0]

    class DecoderWrapper(torch.nn.Module):
        """Causal LM step on flat tensors.

        Inputs: ``input_ids``/``position_ids`` ``(B, S)``, ``attention_mask``
        ``(B, P+S)`` and, with past, ``2*L`` tensors ``(B, kv, P, hd)`` ordered
        key0, value0, key1, ... Outputs: ``logits`` ``(B, S, V)`` then, with
        past, presents ``(B, kv, P+S, hd)`` in the same order.
        """

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past: list[torch.Tensor] | None = None,
        ) -> tuple[torch.Tensor, ...]:
            cache = None
            if with_past:
                assert past is not None and len(past) == 2 * n_layers
                # DynamicCache from legacy ((k, v), ...) pairs; flat order is k0, v0, k1, v1, ...
                pairs = tuple((past[2 * i], past[2 * i + 1]) for i in range(n_layers))
                # transformers annotates the legacy cache as a 1-tuple; it takes one (k, v) pair per layer
                cache = DynamicCache.from_legacy_cache(pairs)  # type: ignore[arg-type]
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=with_past,
                return_dict=True,
            )
            if not with_past:
                return (out.logits,)
            presents: list[torch.Tensor] = []
            for k, v in out.past_key_values.to_legacy_cache():
                presents += [k, v]
            return (out.logits, *presents)

    return DecoderWrapper(loaded.model)


def _io_names(loaded: LoadedModel, with_past: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of the dynamo export (optimum naming)."""
    if not loaded.is_causal_lm:
        inputs = ("input_ids", "attention_mask") + (("token_type_ids",) if _has_token_type_ids(loaded) else ())
        return inputs, ("logits" if loaded.task == "fill-mask" else "last_hidden_state",)
    n_layers = _cache_geometry(loaded)[0]
    kv = [f"{i}.{t}" for i in range(n_layers) for t in ("key", "value")]  # 0.key, 0.value, 1.key, ...
    past = tuple(f"past_key_values.{n}" for n in kv) if with_past else ()
    present = tuple(f"present.{n}" for n in kv) if with_past else ()
    return ("input_ids", "attention_mask", "position_ids") + past, ("logits",) + present


# --------------------------------------------------------------------------- feeds


def dummy_feeds(result: ExportResult, batch: int, seq: int, past: int = 0, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random valid feeds for an exported model.

    Args:
        result: the export to feed.
        batch: batch size.
        seq: new tokens per row.
        past: cached length (with-past decoders only); past tensors are random
            ``(batch, num_kv_heads, past, head_dim)`` float32.
        seed: numpy seed.

    Returns:
        ``name -> array`` for every graph input: int64 ids in ``[0, vocab_size)``,
        all-ones attention mask of length ``past + seq``, positions ``past..past+seq-1``.
    """
    if batch < 1 or seq < 1 or past < 0:
        raise ValueError(f"need batch >= 1, seq >= 1, past >= 0; got batch={batch}, seq={seq}, past={past}")
    if past and not result.with_past:
        raise ValueError(f"past={past} given but the export at {result.path} has no KV cache")
    rng = np.random.default_rng(seed)
    high = result.vocab_size if result.vocab_size > 0 else 100
    feeds: dict[str, np.ndarray] = {}
    for name in result.input_names:
        if name == "input_ids":
            feeds[name] = rng.integers(0, high, size=(batch, seq), dtype=np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past + seq), dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        elif name.startswith("past_key_values."):
            shape = (batch, result.num_kv_heads, past, result.head_dim)
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise ValueError(f"don't know how to make a dummy feed for input {name!r}")
    return feeds


def torch_reference(loaded: LoadedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The PyTorch outputs for ONNX ``feeds``, under the ONNX output names.

    This is the parity reference: the same wrapper that is exported, run eagerly.
    A decoder feed with ``past_key_values.*`` entries returns ``logits`` and
    ``present.*``; without them only ``logits``.

    Args:
        loaded: the model that was exported.
        feeds: ``name -> array`` as passed to ``InferenceSession.run``.
    """
    import torch

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    with torch.inference_mode():
        if not loaded.is_causal_lm:
            names = _io_names(loaded, with_past=False)[1]
            out = _encoder_wrapper(loaded)(t["input_ids"], t["attention_mask"], t.get("token_type_ids"))
            return {names[0]: out.numpy()}
        past_names = sorted(
            (k for k in feeds if k.startswith("past_key_values.")),
            key=lambda k: (int(k.split(".")[1]), k.endswith(".value")),
        )
        with_past = bool(past_names)
        names = _io_names(loaded, with_past)[1]
        if with_past and all(t[k].shape[2] == 0 for k in past_names):
            # an empty cache carries no values, only a shape: take it from this model, which may be the
            # dense reference of a head-pruned export (validate feeds both the same prompts)
            _n_layers, n_kv, hd = _cache_geometry(loaded)
            b = int(t["input_ids"].shape[0])
            past_names = [n for n in _io_names(loaded, True)[0] if n.startswith("past_key_values.")]
            t.update({k: torch.zeros(b, n_kv, 0, hd) for k in past_names})
        if "position_ids" in t:
            pos = t["position_ids"]
        else:  # optimum exports without position_ids: positions follow the cached length
            p = int(t[past_names[0]].shape[2]) if with_past else 0
            pos = torch.arange(p, p + t["input_ids"].shape[1]).expand_as(t["input_ids"])
        outs = _decoder_wrapper(loaded, with_past)(
            t["input_ids"], t["attention_mask"], pos, [t[k] for k in past_names] if with_past else None
        )
        return {n: o.numpy() for n, o in zip(names, outs)}


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence exporter chatter (stdout, warnings, INFO logs) without hiding exceptions."""
    buf = io.StringIO()
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "optimum", "transformers")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    except BaseException:
        if buf.getvalue():  # keep the exporter's own diagnostics reachable at DEBUG
            logger.debug("exporter output before the failure:\n%s", buf.getvalue())
        raise
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _export_dynamo(loaded: LoadedModel, opset: int, with_past: bool) -> ir.Model:
    import torch
    from torch.export import Dim

    in_names, out_names = _io_names(loaded, with_past)
    batch, seq = Dim("batch"), Dim("sequence_length")
    B, S = _TRACE_BATCH, _TRACE_SEQ
    g = torch.Generator().manual_seed(0)
    vocab = int(loaded.config.vocab_size)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    if not loaded.is_causal_lm:
        module = _encoder_wrapper(loaded)
        args: tuple[Any, ...] = (ids, torch.ones(B, S, dtype=torch.long))
        shapes: tuple[Any, ...] = ({0: batch, 1: seq}, {0: batch, 1: seq})
        if "token_type_ids" in in_names:
            args += (torch.zeros(B, S, dtype=torch.long),)
            shapes += ({0: batch, 1: seq},)
    else:
        module = _decoder_wrapper(loaded, with_past)
        n_layers, n_kv, hd = _cache_geometry(loaded)
        P = _TRACE_PAST if with_past else 0
        # Separate Dim for the mask length: torch.export rejects Dim(seq) + Dim(past) here.
        mask_len = Dim("total_sequence_length")
        args = (ids, torch.ones(B, P + S, dtype=torch.long), torch.arange(P, P + S).expand(B, S).contiguous())
        shapes = ({0: batch, 1: seq}, {0: batch, 1: mask_len}, {0: batch, 1: seq})
        if with_past:
            past_len = Dim("past_sequence_length")
            args += ([torch.randn(B, n_kv, P, hd, generator=g) for _ in range(2 * n_layers)],)
            shapes += ([{0: batch, 2: past_len}] * (2 * n_layers),)
    with _quiet():
        program = torch.onnx.export(
            module,
            args,
            f=None,
            input_names=list(in_names),
            output_names=list(out_names),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=shapes,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    n = _gelu_in_fusable_order(program.model)  # on the exporter's IR: no second copy of the weights
    logger.debug("reordered %d exact-GELU tails for ORT's Gelu fusion", n)
    return program.model


def _export_optimum(loaded: LoadedModel, opset: int, with_past: bool, workdir: Path) -> onnx.ModelProto:
    import onnx
    from optimum.exporters.onnx import main_export

    task = loaded.task + ("-with-past" if with_past else "")
    with _quiet():
        main_export(
            str(loaded.path),
            output=str(workdir),
            task=task,
            library_name="transformers",
            opset=opset,
            device="cpu",
            do_validation=False,
            no_post_process=True,
            local_files_only=True,
        )
    return onnx.load(str(workdir / MODEL_FILENAME))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch.export colours its messages


def _check_traceable_rope(loaded: LoadedModel) -> None:
    """Refuse RoPE variants whose frequencies depend on the run-time sequence length.

    transformers recomputes ``inv_freq`` per call for ``rope_type`` "dynamic" (NTK-aware scaling) and
    "longrope" (short/long factor switch) from the largest position seen; ``torch.export`` cannot trace
    that data-dependent branch, and a graph frozen at one length would be wrong past it.

    Raises:
        ExportError: one line naming the variant and the config key.
    """
    rope = getattr(loaded.model.config, "rope_scaling", None) or {}
    kind = str(rope.get("rope_type", rope.get("type", "default")))
    if "dynamic" in kind or kind == "longrope":
        raise ExportError(
            f"{loaded.model_type}: rope_scaling rope_type {kind!r} (config.json) recomputes the rotary frequencies from"
            " the sequence length at run time, which the ONNX export cannot trace; static RoPE types"
            " (default, linear, llama3, yarn) export"
        )


def _is_scalar(value, want: float, tol: float = 0.0) -> bool:
    """``value`` (an onnx_ir Value) is a constant scalar within ``tol`` of ``want``."""
    const = value.const_value if value is not None else None
    if const is None:
        return False
    arr = const.numpy()
    return arr.size == 1 and abs(float(arr.reshape(-1)[0]) - want) <= tol


def _gelu_as_exported(op, x, sqrt2, one, half):
    return op.Mul(x, op.Mul(op.Add(op.Erf(op.Div(x, sqrt2)), one), half))  # x * ((1 + erf(x / sqrt 2)) * 0.5)


def _gelu_fusable(op, x, sqrt2, one, half):
    div = op.Div(x, sqrt2)
    erf = op.Erf(div)
    add = op.Add(erf, one)
    mul = op.Mul(x, add)
    for v in (div, erf, add, mul):  # element-wise with scalars: x's type and shape (kept in value_info as before)
        v.type, v.shape = x.type, x.shape
    return op.Mul(mul, half)  # (x * (1 + erf(x / sqrt 2))) * 0.5


def _gelu_constants(context, x, sqrt2, one, half, **_) -> bool:
    return _is_scalar(sqrt2, 2**0.5, 1e-5) and _is_scalar(one, 1.0) and _is_scalar(half, 0.5)


def _gelu_in_fusable_order(model: ir.Model) -> int:
    """Reorder the exact-GELU tail so ONNX Runtime fuses it into one ``Gelu`` / ``BiasGelu`` kernel (in place).

    torch's dynamo exporter writes ``x * ((1 + erf(x / sqrt 2)) * 0.5)``; ORT's GeluFusion only knows
    ``(x * 0.5) * (1 + erf(..))`` and ``(x * (1 + erf(..))) * 0.5``, so the dynamo graph ran five element-wise
    kernels over every (B, S, intermediate) FFN activation per inference (Div, Erf, Add, Mul, Mul) where the
    optimum export runs one. An onnxscript rewrite rule (every operand order of the commutative ops) turns the
    first form into the second: the same value up to float rounding order. Intermediate values used elsewhere
    are not rewritten (the rewriter checks). Zero matches is not an error: not every model has exact GELU.

    Args:
        model: an ``onnx_ir.Model`` (what ``torch.onnx.export`` builds before serialising), changed in place.

    Returns:
        The number of GELUs reordered.
    """
    from onnxscript.rewriter import pattern

    rule = pattern.RewriteRule(_gelu_as_exported, _gelu_fusable, _gelu_constants, name="GeluInFusableOrder")
    return pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model)


def _normalize(model: onnx.ModelProto) -> None:
    """Make the serialised bytes a function of the graph alone (in place).

    Drops producer version and free-form metadata, clears doc strings, and
    renames every intermediate value and node by topological index, so names
    derived from object ids or counters do not leak into the file. Graph IO
    and initializer names are kept.
    """
    model.producer_version = ""
    del model.metadata_props[:]
    model.doc_string = ""
    graph = model.graph
    graph.doc_string = ""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    rename: dict[str, str] = {}
    for i, node in enumerate(graph.node):
        node.name = f"n{i}_{node.op_type}"
        node.doc_string = ""
        del node.metadata_props[:]
        for j, out in enumerate(node.output):
            if out and out not in keep:
                rename.setdefault(out, f"v{i}_{j}")
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
        for j, name in enumerate(node.output):
            if name in rename:
                node.output[j] = rename[name]
    for vi in graph.value_info:
        if vi.name in rename:
            vi.name = rename[vi.name]
        vi.doc_string = ""
        del vi.metadata_props[:]
    for v in list(graph.input) + list(graph.output) + list(graph.initializer):
        v.doc_string = ""
        del v.metadata_props[:]
    del graph.metadata_props[:]


def _check_optimum_loadable(loaded: LoadedModel) -> None:
    """optimum re-loads the directory with plain transformers, which cannot rebuild edgepipe's structural edits
    (the module transforms recorded in ``config.json``, :mod:`pipeline.transforms`)."""
    import importlib.util

    from pipeline.transforms import recorded_transforms

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        raise ExportError(
            "exporter 'optimum' needs the optional packages optimum and optimum-onnx: pip install 'edgepipe[optimum]'"
        )
    recorded = recorded_transforms(loaded.config)
    if recorded:
        raise ExportError(
            f"{loaded.model_type}: the optimum exporter cannot load {recorded[0].description}"
            f" (config {recorded[0].key}); use exporter 'dynamo'"
        )


@register_exporter(
    "dynamo", description="torch.onnx.export(dynamo=True) on a flat-IO wrapper (default)", check=_check_traceable_rope
)
def _dynamo_exporter(loaded: LoadedModel, opset: int, with_past: bool, workdir: Path) -> ir.Model:
    # the IR model, not a proto: export_onnx streams a large model's weights straight into external data
    return _export_dynamo(loaded, opset, with_past)


@register_exporter(
    "optimum",
    description="optimum.exporters.onnx.main_export (TorchScript tracer; reads the weights from the model folder)",
    check=_check_optimum_loadable,
)
def _optimum_exporter(loaded: LoadedModel, opset: int, with_past: bool, workdir: Path) -> onnx.ModelProto:
    return _export_optimum(loaded, opset, with_past, workdir / "optimum")


def export_onnx(
    loaded: LoadedModel,
    out_dir: Path,
    *,
    opset: int = 18,
    exporter: str = "dynamo",
    with_past: bool | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ExportResult:
    """Export ``loaded`` to ``out_dir/model.onnx`` with dynamic batch/sequence axes.

    Args:
        loaded: the model (from :func:`pipeline.models.load_model`).
        out_dir: directory for ``model.onnx`` (created if needed).
        opset: default-domain opset (18; 23 maps SDPA to the ONNX ``Attention`` op).
        exporter: a registered exporter (:func:`exporters.registry.exporter_names`): ``"dynamo"`` (default) or
            ``"optimum"`` (reads the weights from ``loaded.path``, so in-memory edits not saved there are not seen).
        with_past: text-generation only: include KV-cache IO. ``None`` means True for
            text-generation, False otherwise.
        external_data_threshold: weights larger than this many bytes are written to
            ``model.onnx.data`` beside ``model.onnx`` (ONNX external data; protobuf's 2 GiB limit).

    Returns:
        An :class:`ExportResult` whose names are read back from the file.

    Raises:
        ValueError: bad ``exporter``/``opset``/``with_past``.
        ExportError: the exporter or the ONNX checker failed.
    """
    import onnx
    from onnxscript import ir

    spec = exporter_spec(exporter)  # ValueError naming the registered exporters
    if not 14 <= opset <= 23:
        raise ValueError(f"opset must be in [14, 23], got {opset}")
    if with_past is None:
        with_past = loaded.is_causal_lm
    if with_past and not loaded.is_causal_lm:
        raise ValueError(f"with_past=True needs a text-generation decoder, got {loaded.model_type!r} ({loaded.task})")
    if spec.check is not None:
        spec.check(loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / MODEL_FILENAME
    what = f"{loaded.model_type} ({loaded.task}{', with past' if with_past else ''}) with {exporter} opset {opset}"
    logger.info("exporting %s", what)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp_dir = Path(tmp)
        try:
            tmp_file = tmp_dir / MODEL_FILENAME
            streamed = False
            made = spec.fn(loaded, opset, with_past, tmp_dir)
            if isinstance(made, ir.Model):
                weights = sum(
                    v.const_value.nbytes for v in made.graph.initializers.values() if v.const_value is not None
                )
                if weights > external_data_threshold:
                    # stream each weight from the exporter's tensors into model.onnx.data: building the whole
                    # ModelProto first held a second and (while saving) a third copy of every weight
                    ir.save(made, tmp_file, external_data=data_file(tmp_file).name, size_threshold_bytes=1024)
                    proto, streamed = onnx.load(str(tmp_file), load_external_data=False), True
                else:
                    proto = ir.to_proto(made)
                del made
            else:
                proto = made
            _normalize(proto)
            if streamed:  # graph only: its initializers already point at the data file
                onnx.save_model(proto, str(tmp_file))
            external = streamed or save_onnx(proto, tmp_file, threshold=external_data_threshold)
            onnx.checker.check_model(str(tmp_file), full_check=True)  # by path: handles external data
        except Exception as e:
            cause = _ANSI.sub("", (str(e).strip().splitlines() or [""])[0])[:300]
            raise ExportError(f"{loaded.model_type}: {exporter} export failed: {type(e).__name__}: {cause}") from e
        move_onnx(tmp_file, final)
    if external:
        logger.info("weights written to %s (external data)", data_file(final).name)
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    n_layers, n_kv, hd = _cache_geometry(loaded) if loaded.is_causal_lm else (0, 0, 0)
    result = ExportResult(
        path=final,
        task=loaded.task,
        input_names=tuple(v.name for v in proto.graph.input),
        output_names=tuple(v.name for v in proto.graph.output),
        with_past=with_past,
        num_layers=n_layers,
        num_kv_heads=n_kv,
        head_dim=hd,
        exporter=exporter,
        opset=int(opset_found),
        vocab_size=int(loaded.config.vocab_size),
    )
    logger.info("exported %s to %s (%d nodes)", what, final, len(proto.graph.node))
    return result
