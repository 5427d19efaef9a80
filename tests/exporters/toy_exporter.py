"""A toy exporter for the registry test: one file plus one registration.

It runs the registered ``dynamo`` exporter at opset 17 whatever opset is asked for and records each call, so the
test sees that ``export_onnx`` goes through the registry and describes what the exporter returned.
"""

from __future__ import annotations

from pathlib import Path

from exporters.registry import EXPORTERS, register_exporter

CALLS: list[tuple[str, int, bool]] = []  # (model_type, opset asked, with_past)


@register_exporter("toy_opset17", description="the dynamo exporter pinned to opset 17 (test)")
def toy_opset17(loaded, opset: int, with_past: bool, workdir: Path):
    assert workdir.is_dir() and not any(workdir.iterdir())  # an empty scratch folder of its own
    CALLS.append((loaded.model_type, opset, with_past))
    return EXPORTERS["dynamo"].fn(loaded, 17, with_past, workdir)
