"""Precision ``fp16``: MatMuls in float16, norms / Softmax / residual Adds kept in fp32, fp32 model I/O
(implementation: ``exporters.quantize._fp16``)."""

from __future__ import annotations

from exporters.precision_registry import ConversionJob
from exporters.quantize import _fp16


def convert(job: ConversionJob) -> tuple[int, list[str], list[str]]:
    return _fp16(job.src, job.tmp, job.keep_fp32_ops, job.external)
