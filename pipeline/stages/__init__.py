"""Built-in stages. Importing this package registers each one (explicitly, in pipeline order)."""

from pipeline.stages import export, quantize, validate, benchmark  # noqa: F401
from pipeline.stages import attention, prune, recover  # noqa: F401
from pipeline.stages import verify_gradient  # noqa: F401

__all__ = ["attention", "export", "quantize", "validate", "benchmark", "prune", "recover"]
