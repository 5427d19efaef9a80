"""The precision registry: one entry per precision that ``quantize`` can produce, read by
:func:`exporters.quantize.convert_precision`, the ``quantize`` stage's config and the target-profile schema
(their allowed values come from here, never from a word list).

This module is a leaf: it imports nothing heavy, so ``targets/`` can validate profiles without loading
onnx/onnxruntime. A precision is one file plus one registration::

    # exporters/precisions/my_precision.py
    def convert(job: ConversionJob) -> tuple[int, list[str], list[str]]: ...   # nodes lowered, ops kept fp32, notes

    # here, below the built-ins (or anywhere before a config is validated):
    register_precision("my-precision", description="...", converter="exporters.precisions.my_precision:convert")

The converter writes ``job.tmp`` (plus ``job.tmp.data`` when ``job.external``); ``convert_precision`` then
publishes it atomically and measures its size.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CHUNKED_GATHER_BYTES",
    "INT4_ALGORITHMS",
    "INT4_LM_HEAD",
    "PRECISIONS",
    "ConversionJob",
    "Int4Options",
    "PrecisionSpec",
    "check_precision",
    "precision_names",
    "precision_spec",
    "precision_subset",
    "register_precision",
]

#: int4 weight-only algorithms (``onnxruntime.quantization.matmul_nbits_quantizer``): ``rtn`` = blockwise
#: round-to-nearest (``DefaultWeightOnlyQuantConfig``), ``hqq`` = half-quadratic quantization (calibration-free
#: optimisation of scale/zero point), ``gptq`` = GPTQ (second-order, needs calibration feeds).
INT4_ALGORITHMS: tuple[str, ...] = ("rtn", "hqq", "gptq")
#: what the int4 path does with the LM head (the last constant-weight MatMul/Gemm before the first output).
INT4_LM_HEAD: tuple[str, ...] = ("int4", "int8", "fp32")
#: int8: fp32 size from which an embedding (Gather) table is quantized chunk by chunk by edgepipe before ORT's dynamic
#: quantizer runs (``exporters.chunked_gather``; bit-identical to ORT, without ORT's ~5 table-sized float copies).
#: [I] 64 MiB: below it ORT's copies cost < 0.4 GB and small tables (MiniLM's 47 MB) keep exactly the artifact ORT
#: alone writes; multilingual vocabularies (mBERT 0.37 GB, XLM-R 1 GB) and Llama-class embeddings take the chunked path.
DEFAULT_CHUNKED_GATHER_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Int4Options:
    """int4 weight-only settings: the target profile's ``int4`` block plus the ``quantize`` stage's choices.

    Attributes:
        block_size: weights per quantization block along K (MatMulNBits ``block_size``; a power of 2, >= 16).
        algorithm: one of :data:`INT4_ALGORITHMS`.
        accuracy_level: MatMulNBits ``accuracy_level``: the compute type of A (0 unset, 1 fp32, 2 fp16,
            3 bf16, 4 int8; 4 is the fast int8-dot-product path of ONNX Runtime's CPU kernels).
        embeddings: also quantize embedding tables (``Gather`` -> ``GatherBlockQuantized``, int4 RTN blocks
            along the hidden axis; HQQ has no Gather path in ONNX Runtime, so embeddings use RTN there too).
        lm_head: one of :data:`INT4_LM_HEAD`: int4 like the other layers, 8-bit MatMulNBits, or fp32.
    """

    block_size: int = 32
    algorithm: str = "rtn"
    accuracy_level: int = 4
    embeddings: bool = True
    lm_head: str = "int8"

    def __post_init__(self) -> None:  # API callers get the profile schema's checks (targets.profile.Int4)
        if not 16 <= self.block_size <= 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"int4 block_size must be a power of 2 from 16 to 256, got {self.block_size}")
        if self.algorithm not in INT4_ALGORITHMS:
            raise ValueError(f"unknown int4 algorithm {self.algorithm!r}; known: {', '.join(INT4_ALGORITHMS)}")
        if not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"int4 accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.lm_head not in INT4_LM_HEAD:
            raise ValueError(f"int4 lm_head must be one of {', '.join(INT4_LM_HEAD)}, got {self.lm_head!r}")


@dataclass(frozen=True)
class ConversionJob:
    """Everything a converter may read. Paths: ``src`` (input ``.onnx``), ``tmp`` (where to write the result,
    inside ``tmp_dir``, a private temporary folder beside the destination)."""

    src: Path
    tmp: Path
    tmp_dir: Path
    external: bool = False
    feeds: list[dict[str, Any]] | None = None
    keep_fp32_ops: Sequence[str] = ()
    per_channel: bool = True
    optimize_fp32: bool = False
    int8_op_types: Sequence[str] = ("MatMul", "Gemm")
    quantize_matmul_outputs: bool = False
    weight_type: str = "u8"
    int4: Int4Options = field(default_factory=Int4Options)
    nodes_to_exclude: Sequence[str] = ()  # int8 paths: node names kept in fp32 (mixed precision)
    # int8: Gather tables of at least this many fp32 bytes quantized in chunks (exporters.chunked_gather); None = never
    chunked_gather_bytes: int | None = DEFAULT_CHUNKED_GATHER_BYTES


Converter = Callable[[ConversionJob], "tuple[int, list[str], list[str]]"]


@dataclass(frozen=True)
class PrecisionSpec:
    """One registered precision.

    Attributes:
        name: the value of ``quantize.precision``, of a profile's ``precisions`` and ``tolerances`` keys.
        description: one line for docs and errors.
        converter: the converter, or ``"module:function"`` imported on first use (keeps this module a leaf).
        needs_calibration: ``True`` when the converter always needs ``job.feeds``, or a predicate of the job's
            :class:`Int4Options` / settings (e.g. int4 needs feeds only for GPTQ).
    """

    name: str
    description: str
    converter: Converter | str
    needs_calibration: bool | Callable[[ConversionJob], bool] = False

    def load(self) -> Converter:
        """The converter function (importing its module on first use)."""
        if callable(self.converter):
            return self.converter
        module, _, attr = self.converter.partition(":")
        return getattr(importlib.import_module(module), attr)

    def calibration_needed(self, job: ConversionJob) -> bool:
        return self.needs_calibration(job) if callable(self.needs_calibration) else bool(self.needs_calibration)


PRECISIONS: dict[str, PrecisionSpec] = {}


def register_precision(
    name: str,
    *,
    description: str,
    converter: Converter | str,
    needs_calibration: bool | Callable[[ConversionJob], bool] = False,
) -> PrecisionSpec:
    """Register precision ``name``. Registering a different converter under a taken name raises ValueError."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"precision name must be letters, digits, '-' or '_', got {name!r}")
    spec = PrecisionSpec(name, description, converter, needs_calibration)
    old = PRECISIONS.get(name)
    if old is not None and old.converter != converter:
        raise ValueError(f"precision '{name}' registered twice ({old.converter!r} and {converter!r})")
    PRECISIONS[name] = spec
    return spec


def precision_names() -> list[str]:
    """Registered precision names, in registration order (the built-ins first)."""
    return list(PRECISIONS)


def check_precision(name: object) -> str:
    """``name`` if it is a registered precision; ValueError listing the registered ones otherwise.

    Used as the pydantic validator of every precision field (stage config, target profile)."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; registered precisions: {', '.join(PRECISIONS)}")
    return name


def precision_spec(name: str) -> PrecisionSpec:
    """The registered precision ``name``; ValueError naming the registered ones otherwise."""
    return PRECISIONS[check_precision(name)]


def precision_subset(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple after checking that each is registered (for consumers that support only some)."""
    return tuple(check_precision(n) for n in names)


# --------------------------------------------------------------------------- built-in precisions
register_precision(
    "fp32", description="float32; copied, or ORT-optimized offline", converter="exporters.precisions.fp32:convert"
)
register_precision(
    "fp16",
    description="float16 MatMuls; norms, Softmax and residual Adds kept fp32; fp32 I/O",
    converter="exporters.precisions.fp16:convert",
)
register_precision(
    "int8",
    description="dynamic int8: per-channel int8 weights of MatMul/Gemm (and embeddings), activations quantized at run time",
    converter="exporters.precisions.int8:convert",
)
register_precision(
    "int8-static",
    description="static QDQ int8 calibrated on text (MinMax), for providers that need fixed activation scales",
    converter="exporters.precisions.int8_static:convert",
    needs_calibration=True,
)
register_precision(
    "int4",
    description="int4 weight-only (MatMulNBits, blockwise; RTN, HQQ or GPTQ from the profile), for decoders",
    converter="exporters.precisions.int4:convert",
    needs_calibration=lambda job: job.int4.algorithm == "gptq",
)
