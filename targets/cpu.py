"""What the CPU edgepipe runs on can do, for profiles that describe "this machine" (``int8_weights: host``).

The features come from numpy's runtime CPUID probe (``numpy._core._multiarray_umath.__cpu_features__``), the
same instruction the ONNX Runtime kernels (MLAS) dispatch on, so an emulated CPU (``qemu-x86_64 -cpu Haswell``)
is seen as what it emulates, not as the host underneath (``/proc/cpuinfo`` would show the host).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping

__all__ = ["cpu_features", "host_int8_weight_type", "int8_weight_type_for"]

_ARM = ("aarch64", "arm64", "armv8l", "armv8b")
_X86 = ("x86_64", "amd64", "i686", "i386")


def cpu_features() -> dict[str, bool]:
    """numpy's runtime CPU feature table (e.g. ``{"AVX2": True, "AVX512VNNI": False, ...}``); {} if unknown."""
    import importlib

    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # numpy >= 2, then 1.x
        try:
            table = getattr(importlib.import_module(name), "__cpu_features__", None)
        except ImportError:
            continue
        if isinstance(table, dict):
            return {str(k): bool(v) for k, v in table.items()}
    return {}


def int8_weight_type_for(machine: str, features: Mapping[str, bool]) -> str:
    """The fastest int8 weight type that is exact on a CPU (``machine`` as ``platform.machine()``).

    - ARM -> ``"s8"``: its int8 kernels (NEON / dot-product) accumulate in int32.
    - x86 with AVX-512 VNNI -> ``"s8"``: ``vpdpbusd`` adds u8 x s8 products into int32, exact; ONNX Runtime's
      u8 x s8 kernel is ~3x faster per MatMul than u8 x u8 there (MiniLM int8 DynamicQuantizeMatMul 3.6 vs
      11.2 ms per run, benchmarks/results/tune.md).
    - any other x86 (AVX2, SSE) -> ``"u8"``: the u8 x s8 kernel (``vpmaddubsw``) saturates int16 pair sums
      there; u8 x u8 widens first and is exact.
    - an unknown machine -> ``"u8"`` (exact wherever ORT's x86 and ARM kernels run).

    [I] CPUs with only the 256-bit AVX-VNNI (no AVX-512) get u8: numpy's probe does not report AVX-VNNI.
    """
    m = machine.lower()
    if m in _ARM:
        return "s8"
    if m in _X86 and features.get("AVX512VNNI", False):
        return "s8"
    return "u8"


def host_int8_weight_type() -> str:
    """:func:`int8_weight_type_for` the machine this process runs on."""
    return int8_weight_type_for(platform.machine(), cpu_features())
