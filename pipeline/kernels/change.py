"""The attention swap as a typed record: what the ``attention`` stage decided, carried in the artifact
(``torch_changes["attention"]``, plain JSON) and re-applied by every later stage that loads the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .patterns import BlockSparsePattern, PatternKind, pattern_layout
from .registry import kernel_spec

if TYPE_CHECKING:
    import torch

__all__ = ["AttentionChange", "apply_attention_change"]


@dataclass(frozen=True)
class AttentionChange:
    """One recorded attention swap.

    Attributes:
        kernel: the registered kernel swapped in.
        cache_words: fast-memory budget M per head, in words (block sizes).
        block_size: block-sparse block size b, in tokens.
        pattern: block-sparse pattern kind (``BlockSparsePattern.kind``).
        window_blocks: neighbour key blocks kept on each allowed side.
        global_blocks: leading global / sink blocks.
    """

    kernel: str
    cache_words: int | None = None
    block_size: int = 64
    pattern: PatternKind = "window"
    window_blocks: int = 1
    global_blocks: int = 0

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AttentionChange:
        return cls(**dict(record))

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def block_sparse(self) -> bool:
        """The kernel computes only the kept blocks of ``block_pattern`` (lowered to the block-sparse subgraph)."""
        return kernel_spec(self.kernel).block_sparse

    @property
    def block_pattern(self) -> BlockSparsePattern:
        return BlockSparsePattern(
            kind=self.pattern, block=self.block_size, window_blocks=self.window_blocks, global_blocks=self.global_blocks
        )


def _block_mask_fn(pattern: BlockSparsePattern):
    import torch

    def fn(n_q: int, n_k: int) -> torch.Tensor:
        if n_q != n_k:
            raise ValueError(f"block-sparse attention here needs n_q == n_k (no KV cache), got {n_q} vs {n_k}")
        # (1, 1, nb, nb): the same layout the ONNX lowering computes in-graph
        return torch.from_numpy(pattern_layout(pattern, n_k))[None, None]

    return fn


def apply_attention_change(model: torch.nn.Module, change: AttentionChange, *, kernel: str | None = None) -> int:
    """Re-apply a recorded swap to a freshly loaded model (``kernel`` overrides, e.g. "naive" as the oracle).

    Returns the number of attention modules switched (see ``swap_attention_``).
    """
    from .swap import swap_attention_

    k = kernel or change.kernel
    if change.block_sparse:
        return swap_attention_(
            model, kernel=k, block_size=change.block_size, block_mask_fn=_block_mask_fn(change.block_pattern)
        )
    return swap_attention_(model, kernel=k, cache_words=change.cache_words)
