"""Attention planner: choose the kernel and block sizes with the fewest counted I/O words.

For a fast-memory budget M (words, per head), sequence length n and head dimension d, the planner
evaluates the forward (inference) I/O of each candidate with the closed forms / counting walks of
``io_model`` and keeps the cheapest:

* ``flash`` (FA2 tiling; the streamed block B_c is searched over 1..d, the resident block is the
  largest that fits; the widest B_c within ``io_slack`` (5%) of the minimal count is kept),
  optimal for M >= ~d^2;
* ``small_cache`` (tiled GEMMs with b = floor(sqrt(M/3))), optimal for M = o(d^2);
* ``block_sparse`` when a block density is given (largest square block whose FA2 backward
  footprint fits M; kept blocks = round(density * blocks^2)).

The crossover of the first two sits near M ~ d^2 (the constants of our block rules put it at
roughly 0.6-2 d^2, see benchmarks/results/io.md). Lower bounds use constant 1 (the papers give
Theta only), so ``ratio`` = predicted / bound is a constant-factor gap, not an optimality test.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .flash import fa2_backward_footprint, fa2_forward_footprint
from .io_model import (
    block_sparse_forward_formula,
    fa2_forward_blocks,
    fa2_forward_formula,
    fa2_forward_io,
    lower_bound_forward,
    lower_bound_sparse,
    small_cache_forward_formula,
    small_cache_tile,
)

logger = logging.getLogger(__name__)

__all__ = ["AttentionPlan", "cache_words_from_bytes", "plan_attention"]


@dataclass(frozen=True)
class AttentionPlan:
    """The planner's choice for one attention head (forward pass).

    Attributes:
        algorithm: kernel name for ``attention(kernel=...)``: "flash", "small_cache" or "block_sparse".
        block_q: query block (flash B_r, or tile b).
        block_k: key block (flash B_c, or tile b).
        predicted_io_words: counted slow<->fast words of the forward pass.
        lower_bound_words: forward lower bound (constant 1; sparse: reconstructed bound).
        ratio: predicted_io_words / lower_bound_words.
        peak_working_words: on-chip footprint of the chosen tiling (<= cache_words).
        cache_words: M.
        seq: n.
        head_dim: d.
        notes: the alternatives' counts and the reason for the choice.
    """

    algorithm: str
    block_q: int
    block_k: int
    predicted_io_words: int
    lower_bound_words: float
    ratio: float
    peak_working_words: int
    cache_words: int
    seq: int
    head_dim: int
    notes: str


def cache_words_from_bytes(cache_bytes: int, word_bytes: int = 4) -> int:
    """Words of ``word_bytes`` bytes that fit in ``cache_bytes`` (e.g. 512 KiB of fp32 -> 131072).

    Args:
        cache_bytes: cache size in bytes (> 0).
        word_bytes: bytes per word (4 for fp32, 2 for fp16).
    """
    if cache_bytes <= 0:
        raise ValueError(f"cache_bytes must be positive, got {cache_bytes}")
    if word_bytes <= 0:
        raise ValueError(f"word_bytes must be positive, got {word_bytes}")
    return cache_bytes // word_bytes


def _best_flash(m: int, n: int, d: int, causal: bool, io_slack: float) -> tuple[int, tuple[int, int]] | None:
    """(io, (B_r, B_c)) of the FA2 forward tiling to use, or None if no tile fits.

    The count is smallest for a tiny streamed block B_c (it leaves room for a larger B_r), but
    B_c = 1 turns every tile product into a matrix-vector product; so among tilings whose count
    is within ``io_slack`` of the minimum the one with the largest B_c is returned.
    """
    cands: list[tuple[int, tuple[int, int]]] = []
    for bc in range(1, d + 1):
        try:
            blocks = fa2_forward_blocks(m, d, streamed=bc)
        except ValueError:
            break  # a larger streamed block fits even less
        br = min(blocks[0], n)  # a query block longer than n buys nothing
        # the same number of query blocks, balanced: equal counts without causal masking, and fewer tiles cut
        # by the diagonal with it (n=96, M=700: B_r 32 beats the largest fitting 33)
        for br_ in sorted({br, -(-n // -(-n // br))}):
            blocks = (br_, min(bc, n))
            io = (
                fa2_forward_io(n, d, m, blocks=blocks, causal=True).total
                if causal
                else fa2_forward_formula(n, d, m, blocks=blocks)
            )
            cands.append((io, blocks))
    if not cands:
        return None
    best = min(io for io, _ in cands)
    return max((c for c in cands if c[0] <= (1.0 + io_slack) * best), key=lambda c: (c[1][1], -c[0]))


def plan_attention(
    *,
    cache_words: int,
    seq: int,
    head_dim: int,
    causal: bool = False,
    density: float | None = None,
    word_bytes: int = 4,
    io_slack: float = 0.05,
) -> AttentionPlan:
    """Pick the attention kernel and tiling with the fewest counted forward I/O words.

    Args:
        cache_words: fast-memory budget M in words (per head; see ``cache_words_from_bytes``).
        seq: sequence length n.
        head_dim: head dimension d.
        causal: count only tiles on or below the causal diagonal (flash; small_cache is dense).
        density: fraction of kept blocks of a block-sparse mask; selects ``block_sparse``.
        word_bytes: bytes per word, only reported in ``notes``.
        io_slack: flash tilings within this fraction of the minimal count are considered equal;
            the one with the widest key block wins (0 = strictly minimal count, often B_c = 1).
    """
    m, n, d = cache_words, seq, head_dim
    if m < 3 or n < 1 or d < 1:
        raise ValueError(f"need cache_words >= 3, seq >= 1, head_dim >= 1; got {m}, {n}, {d}")
    if io_slack < 0:
        raise ValueError(f"io_slack must be >= 0, got {io_slack}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    header = f"M={m} words ({m * word_bytes} bytes at {word_bytes} B/word), n={n}, d={d}, M/d^2={m / d**2:.2f}"
    lb = lower_bound_forward(n, d, m)

    if density is not None:
        b = 1
        while fa2_backward_footprint(b + 1, b + 1, d) <= m and b + 1 <= n:
            b += 1
        if fa2_backward_footprint(b, b, d) > m:
            raise ValueError(f"cache_words={m} is too small for a block-sparse tile with head_dim={d}")
        nb = math.ceil(n / b)
        kept = max(1, round(density * nb * nb))
        io = block_sparse_forward_formula(n, d, b, kept)
        lbs = lower_bound_sparse(n * d, density * n * n, m)
        return AttentionPlan(
            "block_sparse",
            b,
            b,
            io,
            lbs,
            io / lbs,
            fa2_backward_footprint(b, b, d),
            m,
            n,
            d,
            f"{header}; block_sparse b={b}, {kept}/{nb * nb} blocks kept; bound = reconstructed sparse bound [R/I]",
        )

    flash = _best_flash(m, n, d, causal, io_slack)
    b = small_cache_tile(m)
    sc_io = small_cache_forward_formula(n, d, m)
    if flash is not None and flash[0] <= sc_io:
        io, (br, bc) = flash
        notes = f"{header}; flash {io} <= small_cache {sc_io} words"
        plan = AttentionPlan("flash", br, bc, io, lb, io / lb, fa2_forward_footprint(br, bc, d), m, n, d, notes)
    else:
        fl = "n/a (no FA tile fits)" if flash is None else str(flash[0])
        notes = f"{header}; small_cache {sc_io} < flash {fl} words"
        plan = AttentionPlan("small_cache", b, b, sc_io, lb, sc_io / lb, 3 * b * b, m, n, d, notes)
    logger.debug("plan: %s", plan)
    return plan
