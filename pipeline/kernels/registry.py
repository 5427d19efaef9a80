"""The attention-kernel registry: one entry per kernel, read by ``attention``, ``swap_attention_`` and the
``attention`` stage's config (its allowed values come from here, never from a word list).

A kernel is one file plus one registration::

    @register_kernel("my_kernel", description="...")
    def my_kernel(q, k, v, *, causal, attn_mask, block_mask, scale, cache_words, block_size) -> Tensor: ...

The function receives the checked public arguments of :func:`pipeline.kernels.attention` (``scale`` resolved)
and returns (B, Hq, Nq, D) in the dtype of q.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

__all__ = ["KERNELS", "KernelSpec", "kernel_spec", "register_kernel", "stage_kernels"]


@dataclass(frozen=True)
class KernelSpec:
    """One registered attention kernel.

    Attributes:
        name: the ``kernel=`` value (and the YAML ``attention.kernel`` value).
        fn: the implementation, see the module docstring for its signature.
        description: one line for docs and errors.
        oracle: a reference kernel (dense, materialises the scores); never offered by the ``attention`` stage.
        block_sparse: computes only the kept blocks of a block pattern: the stage records the pattern, the
            reference for parity is the dense masked oracle, and export lowers it to the block-sparse subgraph
            (otherwise: the target's fused attention operator).
    """

    name: str
    fn: Callable[..., Tensor]
    description: str
    oracle: bool = False
    block_sparse: bool = False


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(name: str, *, description: str, oracle: bool = False, block_sparse: bool = False) -> Callable:
    """Register ``fn`` as kernel ``name``; registering a different function under a taken name raises ValueError."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in KERNELS and KERNELS[name].fn is not fn:
            raise ValueError(
                f"attention kernel '{name}' registered twice ({KERNELS[name].fn.__module__} and {fn.__module__})"
            )
        KERNELS[name] = KernelSpec(name, fn, description, oracle, block_sparse)
        return fn

    return deco


def kernel_spec(name: str) -> KernelSpec:
    """The registered kernel ``name``; ValueError naming the known kernels otherwise."""
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; known: {', '.join(sorted(KERNELS))}")
    return KERNELS[name]


def stage_kernels() -> list[str]:
    """Kernels the ``attention`` stage may swap in (every registered kernel except the oracles), sorted."""
    return sorted(k for k, s in KERNELS.items() if not s.oracle)
