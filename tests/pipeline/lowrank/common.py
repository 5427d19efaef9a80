"""Shared inputs of the low-rank attention tests."""

from __future__ import annotations

import torch

D64 = torch.float64


def uniform(shape, bound: float, seed: int) -> torch.Tensor:
    """float64 entries uniform in [-bound, bound] (bounded entries: the regime of the almost-linear results)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=D64) * 2 - 1) * bound
