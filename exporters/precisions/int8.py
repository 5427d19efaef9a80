"""Precision ``int8``: dynamic int8 (per-channel weights of constant-weight MatMul/Gemm, optionally Gather
tables; activations quantized at run time) (implementation: ``exporters.quantize._int8_dynamic``)."""

from __future__ import annotations

from exporters.precision_registry import ConversionJob
from exporters.quantize import _int8_dynamic


def convert(job: ConversionJob) -> tuple[int, list[str], list[str]]:
    return _int8_dynamic(
        job.src,
        job.tmp,
        job.keep_fp32_ops,
        job.per_channel,
        job.int8_op_types,
        job.weight_type,
        job.external,
        job.nodes_to_exclude,
        job.chunked_gather_bytes,
    )
