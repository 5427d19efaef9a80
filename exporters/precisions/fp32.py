"""Precision ``fp32``: the exported model copied unchanged, or (``optimize_fp32``) ONNX Runtime's
``ORT_ENABLE_EXTENDED`` offline optimization when it keeps parity (implementation: ``exporters.quantize._fp32``)."""

from __future__ import annotations

from exporters.precision_registry import ConversionJob
from exporters.quantize import _fp32


def convert(job: ConversionJob) -> tuple[int, list[str], list[str]]:
    return _fp32(job.src, job.tmp, job.feeds, job.optimize_fp32 and not job.external)
