"""Precision ``int8-static``: QDQ int8 with activation ranges calibrated (MinMax) on ``job.feeds``
(implementation: ``exporters.quantize._int8_static``)."""

from __future__ import annotations

from exporters.precision_registry import ConversionJob
from exporters.quantize import _int8_static


def convert(job: ConversionJob) -> tuple[int, list[str], list[str]]:
    return _int8_static(
        job.src,
        job.tmp,
        job.feeds or [],
        job.keep_fp32_ops,
        job.per_channel,
        job.int8_op_types,
        job.quantize_matmul_outputs,
        str(job.tmp_dir),
        job.weight_type,
        job.external,
        job.nodes_to_exclude,
    )
