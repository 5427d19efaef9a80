"""Built-in stages. Importing this package registers each one (explicitly, in pipeline order)."""

from pipeline.stages import (  # noqa: F401  # noqa: F401  # noqa: F401  (score_model: the score-network implementations)  # noqa: F401
    attention,
    benchmark,
    compile_program,
    export,
    private_context,
    prune,
    quantize,
    recover,
    score_model,
    validate,
    verify_diffusion,
    verify_dp,
    verify_gradient,
)

__all__ = [
    "attention",
    "benchmark",
    "compile_program",
    "export",
    "private_context",
    "prune",
    "quantize",
    "recover",
    "validate",
    "verify_diffusion",
    "verify_dp",
    "verify_gradient",
]
