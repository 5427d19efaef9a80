"""Target profiles: what an edge device can run, as data.

A profile is a YAML file validated by :class:`TargetProfile`. Code asks a profile for capabilities
(``"int8" in profile.precisions``, ``profile.ort_format``), never for its name.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from exporters.precision_registry import INT4_ALGORITHMS, check_precision
from pipeline.errors import TargetError
from pipeline.schema import Frozen, format_validation_error, read_yaml, shown

__all__ = [
    "RESERVED_NAMES",
    "Cache",
    "Int4",
    "StaticShapes",
    "TargetProfile",
    "Tolerance",
    "builtin_target_names",
    "is_profile_path",
    "list_targets",
    "load_target",
]

SparsityPattern = Literal["unstructured", "n:m", "structured"]
AttentionOp = Literal["onnx_attention", "ms_mha"]
Int8Weights = Literal["s8", "u8", "s8-reduce-range", "host"]  # exporters.quantize.INT8_WEIGHT_TYPES + "host"


class Tolerance(Frozen):
    """Parity gate between the exported model on ONNX Runtime and the PyTorch reference."""

    atol: float = Field(gt=0, description="max |onnx - torch| over valid (non-padded) positions")
    min_cosine: float = Field(0.0, ge=-1, le=1, description="min per-token cosine vs the reference")
    min_top1: float | None = Field(
        None,
        ge=0,
        le=1,
        description="models with a logits output: min share of valid positions whose argmax matches the reference",
    )


class Cache(Frozen):
    """Fast-memory sizes in KiB. ``auto`` (host only) reads them from this machine."""

    l1_kb: int | None = Field(None, gt=0, description="L1 data cache per core")
    l2_kb: int | None = Field(None, gt=0, description="L2 cache per core (or per cluster)")
    l3_kb: int | None = Field(None, gt=0, description="last-level cache")
    gpu_shared_kb: int | None = Field(None, gt=0, description="GPU shared memory per SM")
    attention_level: Literal["l1", "l2", "l3", "gpu_shared"] = Field(
        "l2", description="which level the attention planner treats as fast memory M"
    )
    auto: bool = Field(False, description="detect l1/l2/l3 from /sys at load time (host profiles)")

    @model_validator(mode="after")
    def _level_known(self) -> Cache:
        if not self.auto and getattr(self, f"{self.attention_level}_kb") is None:
            raise ValueError(f"attention_level is '{self.attention_level}' but {self.attention_level}_kb is not set")
        return self


class StaticShapes(Frozen):
    """Fixed input shapes for providers that cannot take dynamic ones (NNAPI, CoreML, TensorRT engines)."""

    batch: int = Field(1, ge=1)
    seq: int = Field(128, ge=1)


class Int4(Frozen):
    """int4 weight-only settings of a target (``MatMulNBits``, see ``exporters/precisions/int4.py``)."""

    block_size: int = Field(
        32, ge=16, le=256, description="weights per quantization block along K (a power of 2: MatMulNBits needs it)"
    )
    algorithm: str = Field("rtn", description="rtn (round-to-nearest), hqq (half-quadratic) or gptq (calibrated)")
    accuracy_level: int = Field(
        4, ge=0, le=4, description="MatMulNBits compute type of activations: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size must be a power of 2 (16, 32, 64, 128, 256), got {v}")
        return v

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        if v not in INT4_ALGORITHMS:
            raise ValueError(f"unknown int4 algorithm {v!r}; known: {', '.join(INT4_ALGORITHMS)}")
        return v


_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
#: names a run folder uses for itself (a target's folder sits beside them, ``runs/x/<target>/``)
RESERVED_NAMES = frozenset({"stages", "plots"})


class TargetProfile(Frozen):
    """Everything the pipeline needs to know about one deployment target."""

    name: str = Field(description="short id used in configs and folder names")
    description: str = ""
    arch: Literal["x86_64", "aarch64", "armv7"] = Field(description="CPU architecture of the device")
    device: Literal["cpu", "gpu", "npu"] = "cpu"
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime execution providers in priority order",
    )
    precisions: list[str] = Field(
        min_length=1,
        description="supported precisions (registered in exporters.precision_registry); the first is the default",
    )
    opset: int = Field(23, ge=13, le=24, description="highest ONNX opset the target's runtime executes")
    threads: int | None = Field(None, ge=1, description="intra-op threads (None = all cores)")
    memory_budget_mb: int = Field(
        gt=0,
        description="RAM the model may use on the device, in MiB: the rise in resident memory from before the"
        " ONNX Runtime session is created to the peak during inference (estimated by validate, measured by benchmark)",
    )
    max_context: int | None = Field(
        None,
        ge=1,
        description="decoders: the longest context (prompt + generated tokens) the device serves; the KV cache is"
        " budgeted at this length (omitted = the model's position limit)",
    )
    cache: Cache
    ort_format: bool = Field(False, description="also ship .ort + required-operators config (ORT Mobile)")
    mobile_check: bool = Field(False, description="run ORT's mobile usability check and report it")
    static_shapes: StaticShapes | None = None
    min_provider_coverage: float | None = Field(
        None,
        ge=0,
        le=1,
        description="fail the target when less than this share of the model runs on the first provider"
        " (silent CPU fallback guard; omitted = report only)",
    )
    provider_coverage_by: Literal["nodes", "flops"] = Field(
        "nodes",
        description="what min_provider_coverage counts: the share of graph nodes, or of MatMul/Gemm/Conv/Attention FLOPs",
    )
    fast_patterns: list[SparsityPattern] = Field(
        default_factory=lambda: list[SparsityPattern](["structured"]),
        description="sparsity patterns that make this target faster (others only save size, if anything)",
    )
    attention_ops: list[AttentionOp] = Field(
        default_factory=lambda: list[AttentionOp](["onnx_attention", "ms_mha"]),
        description="fused attention ops, preferred first",
    )
    tolerances: dict[str, Tolerance] = Field(description="parity tolerance for each precision")
    int4: Int4 | None = Field(
        None, description="int4 weight-only settings (block size, algorithm, accuracy level); omitted = the defaults"
    )
    int8_weights: Int8Weights | None = Field(
        None,
        description="int8 weight type: s8 (u8 activations x s8 weights), u8 (u8 x u8), s8-reduce-range (7-bit s8)"
        " or host (the fastest exact type for the CPU edgepipe runs on: s8 on ARM and on x86 with AVX-512 VNNI,"
        " else u8; for profiles of this machine); omitted = u8 on x86_64 (u8 x s8 saturates int16 pair sums on"
        " CPUs without VNNI), s8 on ARM (dot-product kernels accumulate exactly)",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        # the name becomes a folder of the run: letters, digits, '-', '_' only (no control characters, NUL,
        # separators or dots), not starting with '-', and not one of the run folder's own names
        if not _NAME_RE.fullmatch(v):
            raise ValueError(f"name must be 1-64 of [A-Za-z0-9_-], not starting with '-', got {shown(v)}")
        if v.lower() in RESERVED_NAMES:
            raise ValueError(f"name {v!r} is reserved for the run folder's own files; choose another")
        return v

    @field_validator("precisions")
    @classmethod
    def _registered_precisions(cls, v: list[str]) -> list[str]:
        for p in v:
            check_precision(p)
        return v

    @field_validator("tolerances")
    @classmethod
    def _registered_tolerance_keys(cls, v: dict[str, Tolerance]) -> dict[str, Tolerance]:
        for p in v:
            check_precision(p)
        return v

    @model_validator(mode="after")
    def _tolerance_for_each_precision(self) -> TargetProfile:
        missing = [p for p in self.precisions if p not in self.tolerances]
        if missing:
            raise ValueError(f"tolerances missing for precision(s) {missing}")
        if self.providers[-1] != "CPUExecutionProvider" and "CPUExecutionProvider" not in self.providers:
            raise ValueError("providers must include CPUExecutionProvider as the fallback")
        return self

    @property
    def default_precision(self) -> str:
        return self.precisions[0]

    @property
    def int4_settings(self) -> Int4:
        """The profile's ``int4`` block, or the defaults (block 32, RTN, accuracy level 4) when omitted."""
        return self.int4 or Int4()

    @property
    def int8_weight_type(self) -> str:
        """The int8 weight type for this target: the profile's ``int8_weights``, else chosen by ``arch``.

        x86_64 -> ``"u8"``: ONNX Runtime's u8 x s8 kernel on AVX2 without VNNI (``vpmaddubsw``) adds two
        u8*s8 products into a saturating int16, so results depend on the host CPU; u8 x u8 widens to int16
        first and is exact everywhere. ARM -> ``"s8"``: its kernels accumulate exactly in int32.
        ``host`` -> decided from this process's CPU (:func:`targets.cpu.host_int8_weight_type`).
        """
        if self.int8_weights == "host":
            from targets.cpu import host_int8_weight_type

            return host_int8_weight_type()
        if self.int8_weights is not None:
            return self.int8_weights
        return "u8" if self.arch == "x86_64" else "s8"

    def cache_bytes(self, level: str | None = None) -> int:
        """Bytes of the cache level the attention planner uses (``cache.attention_level`` by default)."""
        level = level or self.cache.attention_level
        kb = getattr(self.cache, f"{level}_kb")
        if kb is None:
            raise TargetError(f"target '{self.name}': cache.{level}_kb is not set")
        return int(kb) * 1024


_PROFILE_DIR = "profiles"


def _profile_files() -> dict[str, Path]:
    root = resources.files("targets") / _PROFILE_DIR
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def builtin_target_names() -> list[str]:
    return sorted(_profile_files())


def _detect_host_cache() -> dict[str, int]:
    """l1/l2/l3 sizes in KiB from Linux sysfs (cpu0); empty where unknown."""
    out: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")) if base.exists() else []:
        try:
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        kb = int(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else int(size) // 1024
        out[f"l{level}_kb"] = kb
    return out


def _from_data(data: object, source: str) -> TargetProfile:
    if not isinstance(data, dict):
        raise TargetError(f"{source}: a target profile must be a mapping, got {type(data).__name__}")
    cache = data.get("cache")
    if isinstance(cache, dict) and cache.get("auto"):
        detected = _detect_host_cache()
        data = {
            **data,
            "cache": {
                **{"l1_kb": 32, "l2_kb": 512, "l3_kb": 8192},
                **detected,
                **{k: v for k, v in cache.items() if v is not None},
            },
        }
    try:
        return TargetProfile.model_validate(data)
    except ValidationError as exc:
        raise TargetError(format_validation_error(exc, source=source, model=TargetProfile)) from None


@lru_cache(maxsize=64)
def _load_cached(key: str, mtime: float) -> TargetProfile:
    path = Path(key)
    return _from_data(read_yaml(path), str(path))


def is_profile_path(name_or_path: str | os.PathLike[str]) -> bool:
    """True when a ``targets`` entry names a profile file rather than a built-in profile."""
    s = str(name_or_path)
    return s not in _profile_files() and (s.endswith((".yaml", ".yml")) or os.sep in s)


def load_target(name_or_path: str | os.PathLike[str]) -> TargetProfile:
    """A built-in profile by name (``raspberry-pi-5``) or a user's profile YAML by path.

    Raises:
        TargetError: unknown name, missing or unreadable file, or an invalid profile.
    """
    s = str(name_or_path)
    files = _profile_files()
    if "\0" in s:
        raise TargetError(f"target {shown(s)}: contains a NUL character")
    if s in files:
        path = files[s]
    elif is_profile_path(s):
        path = Path(s).expanduser().resolve()
        if not path.is_file():
            raise TargetError(f"target profile file not found: {shown(s, 200)}")
    else:
        raise TargetError(
            f"unknown target {shown(s)}; built-in targets: {', '.join(sorted(files))} (or give a path to a profile YAML)"
        )
    return _load_cached(str(path), path.stat().st_mtime)


def list_targets(extra_paths: list[str] | None = None) -> list[tuple[TargetProfile, str]]:
    """Built-in profiles plus user files, with where each came from."""
    out = [(load_target(n), "built-in") for n in builtin_target_names()]
    for p in extra_paths or []:
        out.append((load_target(p), str(p)))
    return out
