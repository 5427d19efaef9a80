"""I/O-aware attention kernels, their float64 oracle, I/O accounting and the attention planner."""

from .registry import KERNELS, KernelSpec, kernel_spec, register_kernel, stage_kernels  # isort: skip  (first: kernels register)
from . import block_sparse, flash, reference, small_cache  # noqa: F401  (the built-in kernels register on import)
from .block_masks import density, dilated, from_token_mask, global_tokens, random_blocks, sliding_window
from .dispatch import attention
from .io_model import DEFAULT_CACHE_WORDS, IOCount, lower_bound_backward, lower_bound_forward
from .planner import AttentionPlan, cache_words_from_bytes, plan_attention
from .reference import attention_ref
from .swap import swap_attention_

__all__: list[str] = [
    "DEFAULT_CACHE_WORDS",
    "KERNELS",
    "AttentionPlan",
    "IOCount",
    "KernelSpec",
    "attention",
    "attention_ref",
    "cache_words_from_bytes",
    "density",
    "dilated",
    "from_token_mask",
    "global_tokens",
    "kernel_spec",
    "lower_bound_backward",
    "lower_bound_forward",
    "plan_attention",
    "random_blocks",
    "register_kernel",
    "sliding_window",
    "stage_kernels",
    "swap_attention_",
]
