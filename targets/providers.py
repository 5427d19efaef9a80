"""Execution providers' documented operator support, as data: ``targets/providers/<ProviderName>.yaml``.

Each file lists, per ONNX domain, the operator types an ONNX Runtime execution provider documents as supported,
with the source page in a comment and in ``source``. The lists are approximations of the documented ones (data
types, constant-weight and fusion-only conditions are not modelled; only ``max_rank`` is checked). They serve the
silent-fallback guard (:mod:`runtimes.placement`) for providers that this host does not have.

File format::

    provider: XnnpackExecutionProvider
    source: https://onnxruntime.ai/docs/execution-providers/Xnnpack-ExecutionProvider.html
    ops:
      ai.onnx:
        MatMul: {max_rank: 2, note: "only 2D"}
        Softmax: {}
      com.microsoft:
        QLinearSoftmax: {}
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from pipeline.errors import TargetError
from pipeline.schema import Frozen, format_validation_error, read_yaml

__all__ = ["OpRule", "ProviderOps", "documented_providers", "provider_ops"]

_DIR = "providers"


class OpRule(Frozen):
    """What the provider's documentation says about one operator."""

    max_rank: int | None = Field(None, ge=0, description="highest input rank the provider takes (e.g. 2 = 2D MatMul)")
    note: str = Field("", description="the documented restriction, for the report")


class ProviderOps(Frozen):
    """One provider's documented operator list."""

    provider: str
    source: str = Field(min_length=1, description="the documentation page the list was read from")
    ops: dict[str, dict[str, OpRule]] = Field(description="domain ('ai.onnx', 'com.microsoft') -> op type -> rule")

    @model_validator(mode="after")
    def _has_ops(self) -> ProviderOps:
        if not any(self.ops.values()):
            raise ValueError("ops lists no operator")
        return self

    def rule(self, domain: str, op_type: str) -> OpRule | None:
        """The rule for ``op_type`` in ``domain`` (``""`` means ``ai.onnx``), or None if not documented."""
        return self.ops.get(domain or "ai.onnx", {}).get(op_type)


def _files() -> dict[str, Path]:
    root = resources.files("targets") / _DIR
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def documented_providers() -> list[str]:
    """Providers that have a shipped operator list."""
    return sorted(_files())


@lru_cache(maxsize=32)
def provider_ops(provider: str) -> ProviderOps | None:
    """The shipped operator list of ``provider`` (e.g. ``"XnnpackExecutionProvider"``), or None if none ships.

    Raises:
        TargetError: the shipped file is invalid or names another provider.
    """
    path = _files().get(provider)
    if path is None:
        return None
    try:
        ops = ProviderOps.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise TargetError(format_validation_error(exc, source=str(path))) from None
    if ops.provider != provider:
        raise TargetError(f"{path}: provider: '{ops.provider}' does not match the file name '{provider}'")
    return ops
