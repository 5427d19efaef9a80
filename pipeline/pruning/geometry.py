"""Shape facts about one self-attention block, shared by every pruner.

The pruners see each layer's query/key/value/output projections as plain ``(out_features, in_features)``
matrices (GPT-2's transposed ``Conv1D`` and fused ``c_attn`` are converted by the model adapter), so an
algorithm written against :class:`AttentionGeometry` works for BERT-, GPT-2- and Llama-family models alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["AttentionGeometry"]

# apply_rope(x, positions) -> x rotated; x: (B, H, N, head_dim), positions: (B, N) int64.
RopeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionGeometry:
    """How Q, K and the scores of one attention block are formed.

    Args:
        num_heads: query heads H.
        num_kv_heads: key/value heads (H for MHA, fewer for grouped-query attention).
        head_dim: per-head width of Q and K (``hidden // num_heads`` unless the config says otherwise).
        causal: True for decoders (position i attends to j <= i), False for bidirectional encoders.
        scale: factor applied to Q·Kᵀ before softmax, normally ``head_dim ** -0.5``.
        rope: rotary embedding applied to Q and K after projection (Llama family), or None.
        v_head_dim: per-head width of V (and of the head's block of o's input) when it differs from the q/k
            width (QK-dimension pruning narrows q/k only); None = ``head_dim``.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    scale: float
    rope: RopeFn | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def value_head_dim(self) -> int:
        """Per-head width of V / of o's input columns."""
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads
