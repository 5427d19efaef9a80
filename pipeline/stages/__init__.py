"""Built-in stages. Importing this package registers each one (explicitly, in pipeline order)."""

from pipeline.stages import export, quantize, validate, benchmark  # noqa: F401
from pipeline.stages import attention, prune, recover  # noqa: F401
from pipeline.stages import compile_program  # noqa: F401
from pipeline.stages import verify_diffusion, score_model  # noqa: F401  (score_model: the score-network implementations)
from pipeline.stages import private_context, verify_dp  # noqa: F401
from pipeline.stages import verify_gradient  # noqa: F401

__all__ = [
    "attention", "export", "quantize", "validate", "benchmark", "prune", "recover", "compile_program", "verify_diffusion",
    "private_context", "verify_dp", "verify_gradient",
]
