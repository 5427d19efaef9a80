"""I/O-aware attention kernels, their float64 oracle, I/O accounting and the attention planner."""

from .block_masks import density, dilated, from_token_mask, global_tokens, random_blocks, sliding_window
from .flash import KERNELS, attention
from .io_model import DEFAULT_CACHE_WORDS, IOCount, lower_bound_backward, lower_bound_forward
from .planner import AttentionPlan, cache_words_from_bytes, plan_attention
from .reference import attention_ref
from .swap import swap_attention_

__all__: list[str] = [
    "DEFAULT_CACHE_WORDS",
    "KERNELS",
    "AttentionPlan",
    "IOCount",
    "attention",
    "attention_ref",
    "cache_words_from_bytes",
    "density",
    "dilated",
    "from_token_mask",
    "global_tokens",
    "lower_bound_backward",
    "lower_bound_forward",
    "plan_attention",
    "random_blocks",
    "sliding_window",
    "swap_attention_",
]
