"""Block-sparse attention patterns at block granularity: what the ``block_sparse`` kernel computes, what the
``attention`` stage records and what the ONNX lowering (``exporters.block_sparse_graph``) builds in-graph.

numpy only: the layouts are shared by the PyTorch kernel's block masks and the host-side ONNX helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["BlockSparsePattern", "PatternKind", "pattern_layout", "pattern_token_mask"]

PatternKind = Literal["window", "causal_window", "global_window", "explicit"]


@dataclass(frozen=True)
class BlockSparsePattern:
    """A block-sparse attention pattern at ``block``-token granularity.

    Args:
        kind: ``"window"``: bidirectional, query block i keeps key blocks |i - j| <= w.
            ``"causal_window"``: key blocks i - w <= j <= i plus ``global_blocks`` leading
            "sink" key blocks, token-level causal. ``"global_window"``: ``window`` plus
            ``global_blocks`` leading blocks that attend to / are attended by everything.
            ``"explicit"``: a user layout fed at run time (see :func:`explicit_block_inputs`).
        block: block size in tokens (e.g. 64).
        window_blocks: w, the number of neighbour blocks kept on each allowed side.
        global_blocks: g, number of leading global blocks (not allowed for ``window``).
        layout: ``explicit`` only: (nb, nb) bool block layout for the host-side helper
            and the oracle; rows are query blocks, columns key blocks.
        query_group: query blocks per superblock sharing one gathered key range (the
            2, i.e. 128-token superblocks for block 64, measured fastest on ORT CPU).
        causal: ``explicit`` only: also apply token-level causality.
    """

    kind: PatternKind
    block: int
    window_blocks: int = 0
    global_blocks: int = 0
    layout: np.ndarray | None = field(default=None, compare=False)
    query_group: int = 2
    causal: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("window", "causal_window", "global_window", "explicit"):
            raise ValueError(f"kind must be window/causal_window/global_window/explicit, got {self.kind!r}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if self.window_blocks < 0:
            raise ValueError(f"window_blocks must be >= 0, got {self.window_blocks}")
        if self.global_blocks < 0:
            raise ValueError(f"global_blocks must be >= 0, got {self.global_blocks}")
        if self.query_group < 1:
            raise ValueError(f"query_group must be >= 1, got {self.query_group}")
        if self.kind == "window" and self.global_blocks:
            raise ValueError(f"kind 'window' takes no global blocks (got {self.global_blocks}); use 'global_window'")
        if self.kind == "global_window" and self.global_blocks < 1:
            raise ValueError(f"kind 'global_window' needs global_blocks >= 1, got {self.global_blocks}")
        if self.kind == "explicit":
            if self.layout is None:
                raise ValueError("kind 'explicit' needs a layout (nb, nb) bool array")
            lay = np.asarray(self.layout)
            if lay.ndim != 2 or lay.shape[0] != lay.shape[1]:
                raise ValueError(f"layout must be square (nb, nb), got shape {lay.shape}")
            if self.global_blocks:
                raise ValueError(
                    f"explicit layouts encode global blocks themselves; got global_blocks={self.global_blocks}"
                )
        elif self.causal:
            raise ValueError(f"causal=True is only for kind 'explicit'; got kind {self.kind!r}")

    @property
    def is_causal(self) -> bool:
        """Whether token-level causality applies."""
        return self.kind == "causal_window" or (self.kind == "explicit" and self.causal)

    @property
    def superblock(self) -> int:
        """Query superblock size bq in tokens."""
        return self.query_group * self.block


def pattern_layout(pattern: BlockSparsePattern, n: int) -> np.ndarray:
    """Block layout (nb, nb) bool of ``pattern`` for ``n`` tokens, nb = ceil(n / block).

    Args:
        pattern: the pattern.
        n: sequence length.

    Returns:
        ``layout[i, j]`` is True when query block i attends to key block j (token-level
        causality for causal patterns is applied separately by the consumer).
    """
    nb = math.ceil(n / pattern.block)
    if pattern.kind == "explicit":
        lay = np.asarray(pattern.layout, dtype=bool)
        if lay.shape[0] < nb:
            raise ValueError(f"explicit layout has {lay.shape[0]} blocks, n={n} needs {nb}")
        return lay[:nb, :nb].copy()
    i = np.arange(nb)[:, None]
    j = np.arange(nb)[None, :]
    w, g = pattern.window_blocks, pattern.global_blocks
    if pattern.kind == "causal_window":
        return ((j <= i) & (j >= i - w)) | (j < g)
    lay = np.abs(i - j) <= w
    if pattern.kind == "global_window":
        lay = lay | (i < g) | (j < g)
    return lay


def pattern_token_mask(pattern: BlockSparsePattern, n: int) -> np.ndarray:
    """Token-level (n, n) bool mask of ``pattern`` (block layout plus causality), for dense
    masked baselines.

    Args:
        pattern: the pattern.
        n: sequence length.
    """
    blk = np.arange(n) // pattern.block
    mask = pattern_layout(pattern, n)[blk[:, None], blk[None, :]]
    if pattern.is_causal:
        mask &= np.arange(n)[None, :] <= np.arange(n)[:, None]
    return mask
