"""Two-level memory I/O accounting for attention algorithms (per head, in words).

Model (the two-level memory model of FlashAttention's I/O analysis): slow memory is unbounded, the fast memory (cache / SRAM) holds M words,
cost = words moved between the two, compute is free. Each algorithm below is a *counting walk*
over exactly the tiles its kernel visits (``pipeline.kernels.flash`` / ``small_cache`` /
``block_sparse`` use the same block-size rules from this module), returning
``IOCount(reads, writes, peak_fast_words)``; ``peak_fast_words`` is the largest number of words the
walk holds in fast memory at once and is asserted ``<= M``.

Closed forms are separate ``*_formula`` functions; tests check walk == formula.

Block-size rules (design choice): the operand kept resident across
the inner loop gets the large block, the streamed operand gets ``min(d, floor(M / (8 d)))`` (forward)
or ``min(d, floor(M / (16 d)))`` (backward), and the resident block is the largest that keeps the
footprint <= M. FlashAttention's ``ceil(M / 4d)`` rule can overflow M by ~25% once the score block is
counted, so it is not used verbatim. ``fa*_blocks(..., streamed=...)`` accepts an override.

Lower bounds: the papers give Theta() only, no constants; ``lower_bound_*`` use constant 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_WORDS",
    "IOCount",
    "block_sparse_backward_formula",
    "block_sparse_backward_io",
    "block_sparse_forward_formula",
    "block_sparse_forward_io",
    "fa1_backward_blocks",
    "fa1_backward_formula",
    "fa1_backward_io",
    "fa1_forward_blocks",
    "fa1_forward_formula",
    "fa1_forward_io",
    "fa2_backward_blocks",
    "fa2_backward_formula",
    "fa2_backward_io",
    "fa2_forward_blocks",
    "fa2_forward_formula",
    "fa2_forward_io",
    "lower_bound_backward",
    "lower_bound_forward",
    "lower_bound_sparse",
    "small_cache_backward_formula",
    "small_cache_backward_io",
    "small_cache_forward_formula",
    "small_cache_forward_io",
    "small_cache_tile",
    "standard_backward_formula",
    "standard_backward_io",
    "standard_forward_formula",
    "standard_forward_io",
    "tiled_gemm_formula",
    "tiled_gemm_io",
]

# 512 KiB of fp32 words: a typical edge-CPU L2 (Cortex-A72 / A76 class). Used when M is not given.
DEFAULT_CACHE_WORDS = 131072


@dataclass(frozen=True)
class IOCount:
    """Words moved between slow and fast memory.

    Attributes:
        reads: words loaded slow -> fast.
        writes: words stored fast -> slow (initialisation writes included).
        peak_fast_words: largest fast-memory occupancy of the walk.
    """

    reads: int
    writes: int
    peak_fast_words: int

    @property
    def total(self) -> int:
        return self.reads + self.writes


class _Counter:
    """Load/store counter with a fast-memory occupancy tracker."""

    def __init__(self, cache_words: int | None) -> None:
        self.m = cache_words
        self.reads = self.writes = self.live = self.peak = 0

    def load(self, words: int) -> None:  # slow -> fast, stays live until freed
        self.reads += words
        self.alloc(words)

    def alloc(self, words: int) -> None:  # on-chip scratch (accumulators, score tile)
        self.live += words
        self.peak = max(self.peak, self.live)
        if self.m is not None and self.live > self.m:
            raise AssertionError(f"fast-memory footprint {self.live} exceeds M={self.m}")

    def store(self, words: int) -> None:  # fast -> slow; the words stay live until freed
        self.writes += words

    def write_init(self, words: int) -> None:  # initialise slow memory (e.g. O = 0): streamed
        self.writes += words

    def free(self, words: int) -> None:
        self.live -= words

    def result(self) -> IOCount:
        return IOCount(self.reads, self.writes, self.peak)


def _blocks(n: int, b: int) -> list[tuple[int, int]]:
    """[(start, size)] of ceil(n/b) blocks; the last one may be short."""
    return [(s, min(b, n - s)) for s in range(0, n, b)]


def _check(cache_words: int, head_dim: int) -> None:
    if cache_words < 1 or head_dim < 1:
        raise ValueError(f"cache_words and head_dim must be positive, got M={cache_words}, d={head_dim}")


def _too_small(name: str, m: int, d: int) -> ValueError:
    return ValueError(f"cache_words={m} is too small for {name} with head_dim={d}")


# ---------------------------------------------------------------- block-size rules (shared with kernels)
def fa1_forward_blocks(cache_words: int, head_dim: int, *, streamed: int | None = None) -> tuple[int, int]:
    """(B_r, B_c) for FA1 forward: K_j, V_j resident (B_c), Q_i, O_i streamed (B_r).

    Footprint: 2 B_c d + 2 B_r d + 2 B_r + B_r B_c <= M.
    """
    m, d = cache_words, head_dim
    _check(m, d)
    br = streamed if streamed is not None else max(1, min(d, m // (8 * d)))
    bc = (m - 2 * br * d - 2 * br) // (2 * d + br)
    if bc < 1:
        raise _too_small("FA1 forward", m, d)
    return br, bc


def fa1_backward_blocks(cache_words: int, head_dim: int, *, streamed: int | None = None) -> tuple[int, int]:
    """(B_r, B_c) for FA1 backward; footprint 4 B_c d + 4 B_r d + 2 B_r + 2 B_r B_c <= M."""
    m, d = cache_words, head_dim
    _check(m, d)
    br = streamed if streamed is not None else max(1, min(d, m // (16 * d)))
    bc = (m - 4 * br * d - 2 * br) // (4 * d + 2 * br)
    if bc < 1:
        raise _too_small("FA1 backward", m, d)
    return br, bc


def fa2_forward_blocks(cache_words: int, head_dim: int, *, streamed: int | None = None) -> tuple[int, int]:
    """(B_r, B_c) for FA2 forward: Q_i, O_acc, m, l resident (B_r), K_j, V_j streamed (B_c).

    Footprint: 2 B_r d + 2 B_r + 2 B_c d + B_r B_c <= M.
    """
    m, d = cache_words, head_dim
    _check(m, d)
    bc = streamed if streamed is not None else max(1, min(d, m // (8 * d)))
    br = (m - 2 * bc * d) // (2 * d + 2 + bc)
    if br < 1:
        raise _too_small("FA2 forward", m, d)
    return br, bc


def fa2_backward_blocks(cache_words: int, head_dim: int, *, streamed: int | None = None) -> tuple[int, int]:
    """(B_r, B_c) for FA2 backward: K_j, V_j, dK_j, dV_j resident (B_c); Q_i, dO_i, dQ_i, L_i, D_i streamed.

    Footprint: 4 B_c d + 3 B_r d + 2 B_r + 2 B_r B_c <= M.
    """
    m, d = cache_words, head_dim
    _check(m, d)
    br = streamed if streamed is not None else max(1, min(d, m // (16 * d)))
    bc = (m - 3 * br * d - 2 * br) // (4 * d + 2 * br)
    if bc < 1:
        raise _too_small("FA2 backward", m, d)
    return br, bc


def small_cache_tile(cache_words: int) -> int:
    """b = floor(sqrt(M / 3)): the A, B and C-accumulator tiles of a tiled GEMM fit in M."""
    b = math.isqrt(cache_words // 3)
    if b < 1:
        raise ValueError(f"cache_words={cache_words} is too small for a tiled GEMM (needs >= 3)")
    return b


# ---------------------------------------------------------------- counting walks
def standard_forward_io(n: int, d: int) -> IOCount:
    """Standard attention that materialises S and P: S = QK^T, P = softmax(S), O = PV.

    Each matrix is read/written once (the textbook count; it implicitly assumes a K or V row
    block plus one score row fit in fast memory, so ``peak_fast_words`` = nd + n + d).
    """
    c = _Counter(None)
    c.reads += 2 * n * d  # Q, K
    c.writes += n * n  # S
    c.reads += n * n  # S
    c.writes += n * n  # P
    c.reads += n * n + n * d  # P, V
    c.writes += n * d  # O
    return IOCount(c.reads, c.writes, n * d + n + d)


def standard_backward_io(n: int, d: int) -> IOCount:
    """Standard backward with materialised n x n matrices (one read/write per matrix per use).

    dV = P^T dO; dP = dO V^T; dS = P o (dP - rowsum(P o dP)); dQ = dS K; dK = dS^T Q.
    """
    reads = (n * n + n * d) + 2 * n * d + 2 * n * n + (n * n + n * d) + (n * n + n * d)
    writes = n * d + n * n + n * n + n * d + n * d
    return IOCount(reads, writes, n * d + n + d)


def fa1_forward_io(n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None) -> IOCount:
    """FA1 forward (Dao et al. 2022 Alg. 1): outer loop over key blocks, O, l, m re-read per block."""
    br, bc = blocks or fa1_forward_blocks(cache_words, d)
    c = _Counter(cache_words)
    c.write_init(n * d + 2 * n)  # O = 0, l = 0, m = -inf in slow memory
    for _, sc in _blocks(n, bc):
        c.load(2 * sc * d)  # K_j, V_j
        for _, sr in _blocks(n, br):
            c.load(2 * sr * d + 2 * sr)  # Q_i, O_i, l_i, m_i
            c.alloc(sr * sc)  # S / P tile
            c.store(sr * d + 2 * sr)  # O_i, l_i, m_i
            c.free(sr * sc + 2 * sr * d + 2 * sr)
        c.free(2 * sc * d)
    return c.result()


def fa1_backward_io(n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None) -> IOCount:
    """FA1 backward (FA1 App. B): outer over key blocks with dK_j, dV_j on chip; dQ_i read-modify-written."""
    br, bc = blocks or fa1_backward_blocks(cache_words, d)
    c = _Counter(cache_words)
    c.write_init(n * d)  # dQ = 0
    for _, sc in _blocks(n, bc):
        c.load(2 * sc * d)  # K_j, V_j
        c.alloc(2 * sc * d)  # dK_j, dV_j accumulators
        for _, sr in _blocks(n, br):
            c.load(4 * sr * d + 2 * sr)  # Q_i, O_i, dO_i, dQ_i, l_i, m_i
            c.alloc(2 * sr * sc)  # P and dP/dS tiles
            c.store(sr * d)  # dQ_i
            c.free(2 * sr * sc + 4 * sr * d + 2 * sr)
        c.store(2 * sc * d)  # dK_j, dV_j
        c.free(4 * sc * d)
    return c.result()


def _fa2_forward_walk(n_q: int, n_k: int, d: int, cache_words: int | None, br: int, bc: int, kept) -> IOCount:
    c = _Counter(cache_words)
    for i, (_, sr) in enumerate(_blocks(n_q, br)):
        c.load(sr * d)  # Q_i
        c.alloc(sr * d + 2 * sr)  # O_acc, m, l on chip
        for j, (_, sc) in enumerate(_blocks(n_k, bc)):
            if not kept(i, j):
                continue
            c.load(2 * sc * d)  # K_j, V_j
            c.alloc(sr * sc)  # S / P tile
            c.free(sr * sc + 2 * sc * d)
        c.store(sr * d + sr)  # O_i, L_i = m + log l
        c.free(2 * sr * d + 2 * sr)
    return c.result()


def _fa2_backward_walk(n_q: int, n_k: int, d: int, cache_words: int | None, br: int, bc: int, kept) -> IOCount:
    c = _Counter(cache_words)
    for _, sr in _blocks(n_q, br):  # pre-pass D = rowsum(dO o O)
        c.load(2 * sr * d)
        c.alloc(sr)
        c.store(sr)
        c.free(2 * sr * d + sr)
    c.write_init(n_q * d)  # dQ = 0
    for j, (_, sc) in enumerate(_blocks(n_k, bc)):
        c.load(2 * sc * d)  # K_j, V_j
        c.alloc(2 * sc * d)  # dK_j, dV_j
        for i, (_, sr) in enumerate(_blocks(n_q, br)):
            if not kept(i, j):
                continue
            c.load(3 * sr * d + 2 * sr)  # Q_i, dO_i, dQ_i, L_i, D_i
            c.alloc(2 * sr * sc)  # P and dP/dS tiles
            c.store(sr * d)  # dQ_i
            c.free(2 * sr * sc + 3 * sr * d + 2 * sr)
        c.store(2 * sc * d)  # dK_j, dV_j
        c.free(4 * sc * d)
    return c.result()


def _all(i: int, j: int) -> bool:
    return True


def fa2_forward_io(
    n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None, causal: bool = False
) -> IOCount:
    """FA2 forward: outer over query blocks with O_acc, m, l on chip; K, V streamed; writes O and L.

    Args:
        causal: skip tiles entirely above the (square) diagonal.
    """
    br, bc = blocks or fa2_forward_blocks(cache_words, d)
    kept = (lambda i, j: j * bc <= min(n, (i + 1) * br) - 1) if causal else _all
    return _fa2_forward_walk(n, n, d, cache_words, br, bc, kept)


def fa2_backward_io(
    n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None, causal: bool = False
) -> IOCount:
    """FA2 backward: D pre-pass, outer over key blocks with dK_j, dV_j on chip, P = exp(S - L) recomputed."""
    br, bc = blocks or fa2_backward_blocks(cache_words, d)
    kept = (lambda i, j: j * bc <= min(n, (i + 1) * br) - 1) if causal else _all
    return _fa2_backward_walk(n, n, d, cache_words, br, bc, kept)


def tiled_gemm_io(p: int, q: int, r: int, cache_words: int | None, *, tile: int | None = None) -> IOCount:
    """C (p x r) = A (p x q) B (q x r) with b x b tiles: per output tile, stream the k-tiles of A and B.

    ``cache_words`` None means unbounded fast memory; ``tile`` is then required."""
    if not tile:
        if cache_words is None:
            raise ValueError("tiled_gemm_io needs a tile size when cache_words is None (unbounded)")
        tile = small_cache_tile(cache_words)
    b = tile
    c = _Counter(cache_words)
    for _, si in _blocks(p, b):
        for _, sj in _blocks(r, b):
            c.alloc(si * sj)  # C accumulator tile
            for _, sk in _blocks(q, b):
                c.load(si * sk + sk * sj)  # A_ik, B_kj
                c.free(si * sk + sk * sj)
            c.store(si * sj)
            c.free(si * sj)
    return c.result()


def _softmax_rows_io(c: _Counter, n_rows: int, n_cols: int) -> None:
    """Row softmax of an n_rows x n_cols matrix in slow memory: P and L = m + log l written.

    A row (plus m, l) that fits in fast memory takes one pass (read S, write P); otherwise two
    (online max/sum, then read S again and write P).
    """
    if n_cols + 2 <= (c.m if c.m is not None else n_cols + 2):
        for _ in range(n_rows):
            c.load(n_cols)
            c.alloc(2)
            c.store(n_cols + 1)  # P row (in place of S), L_i
            c.free(n_cols + 2)
    else:
        assert c.m is not None  # a row does not fit: the fast memory is bounded
        chunk = c.m - 2
        for _ in range(n_rows):
            c.alloc(2)
            for _, s in _blocks(n_cols, chunk):  # pass 1: running max / sum
                c.load(s)
                c.free(s)
            c.store(1)  # L_i
            for _, s in _blocks(n_cols, chunk):  # pass 2: P = exp(S - L)
                c.load(s)
                c.store(s)
                c.free(s)
            c.free(2)


def _elementwise_io(c: _Counter, read_words: int, write_words: int, tile: int) -> None:
    """Streamed elementwise pass: reads and writes each word once, in chunks that fit."""
    c.reads += read_words
    c.writes += write_words
    c.peak = max(c.peak, min(tile, read_words + write_words))


def _gemm(c: _Counter, p: int, q: int, r: int, b: int) -> None:
    g = tiled_gemm_io(p, q, r, c.m, tile=b)
    c.reads += g.reads
    c.writes += g.writes
    c.peak = max(c.peak, g.peak_fast_words)


def small_cache_forward_io(n: int, d: int, cache_words: int) -> IOCount:
    """Small-cache forward given Q, K, V: S = QK^T (tiled), row softmax (streamed), O = PV (tiled)."""
    b = small_cache_tile(cache_words)
    c = _Counter(cache_words)
    _gemm(c, n, d, n, b)  # S = Q K^T
    _softmax_rows_io(c, n, n)  # P, L
    _gemm(c, n, n, d, b)  # O = P V
    return c.result()


def small_cache_backward_io(n: int, d: int, cache_words: int) -> IOCount:
    """Small-cache backward as the kernel runs it, given Q, K, V, O, dO, L (all in slow memory).

    S = QK^T; P = exp(S - L); dV = P^T dO; dP = dO V^T; D = rowsum(dO o O); dS = P o (dP - D);
    dQ = dS K; dK = dS^T Q. Five tiled GEMMs, the n x n intermediates live in slow memory.
    """
    b = small_cache_tile(cache_words)
    c = _Counter(cache_words)
    tile = 3 * b * b
    _gemm(c, n, d, n, b)  # S
    _elementwise_io(c, n * n + n, n * n, tile)  # P = exp(S - L)
    _gemm(c, n, n, d, b)  # dV = P^T dO
    _gemm(c, n, d, n, b)  # dP = dO V^T
    _elementwise_io(c, 2 * n * d, n, tile)  # D
    _elementwise_io(c, 2 * n * n + n, n * n, tile)  # dS
    _gemm(c, n, n, d, b)  # dQ = dS K
    _gemm(c, n, n, d, b)  # dK = dS^T Q
    return c.result()


def _block_kept(block_mask: list[list[bool]]) -> Callable[[int, int], bool]:
    rows = [list(map(bool, r)) for r in block_mask]
    return lambda i, j: rows[i][j]


def block_sparse_forward_io(
    n: int, d: int, block_size: int, block_mask: Iterable[Iterable[bool]], cache_words: int | None = None
) -> IOCount:
    """Block-sparse FA2 forward with b x b blocks; only kept blocks load K_j, V_j.

    Args:
        block_mask: ceil(n/b) x ceil(n/b) nested booleans (one head).
    """
    bm = [list(map(bool, r)) for r in block_mask]
    return _fa2_forward_walk(n, n, d, cache_words, block_size, block_size, _block_kept(bm))


def block_sparse_backward_io(
    n: int, d: int, block_size: int, block_mask: Iterable[Iterable[bool]], cache_words: int | None = None
) -> IOCount:
    """Block-sparse FA2 backward with b x b blocks; only kept blocks touch Q_i, dO_i, dQ_i."""
    bm = [list(map(bool, r)) for r in block_mask]
    return _fa2_backward_walk(n, n, d, cache_words, block_size, block_size, _block_kept(bm))


# ---------------------------------------------------------------- closed forms
def standard_forward_formula(n: int, d: int) -> int:
    """4 n^2 + 4 n d."""
    return 4 * n * n + 4 * n * d


def standard_backward_formula(n: int, d: int) -> int:
    """7 n^2 + 8 n d (our Theta(n^2 + nd) instance, see ``standard_backward_io``)."""
    return 7 * n * n + 8 * n * d


def fa1_forward_formula(n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None) -> int:
    """2nd + (nd + 2n) + T_c (3nd + 4n)."""
    _, bc = blocks or fa1_forward_blocks(cache_words, d)
    return 2 * n * d + (n * d + 2 * n) + math.ceil(n / bc) * (3 * n * d + 4 * n)


def fa1_backward_formula(n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None) -> int:
    """5nd + T_c (5nd + 2n)."""
    _, bc = blocks or fa1_backward_blocks(cache_words, d)
    return 5 * n * d + math.ceil(n / bc) * (5 * n * d + 2 * n)


def fa2_forward_formula(n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None) -> int:
    """2nd + n + 2nd T_r."""
    br, _ = blocks or fa2_forward_blocks(cache_words, d)
    return 2 * n * d + n + 2 * n * d * math.ceil(n / br)


def fa2_backward_formula(n: int, d: int, cache_words: int, *, blocks: tuple[int, int] | None = None) -> int:
    """7nd + n + T_c (4nd + 2n)."""
    _, bc = blocks or fa2_backward_blocks(cache_words, d)
    return 7 * n * d + n + math.ceil(n / bc) * (4 * n * d + 2 * n)


def tiled_gemm_formula(p: int, q: int, r: int, tile: int) -> int:
    """pq ceil(r/b) + qr ceil(p/b) + pr  (= 2pqr/b + pr when b divides p and r)."""
    return p * q * math.ceil(r / tile) + q * r * math.ceil(p / tile) + p * r


def _softmax_formula(n_rows: int, n_cols: int, cache_words: int) -> int:
    passes_read = 1 if n_cols + 2 <= cache_words else 2
    return n_rows * (passes_read * n_cols + n_cols + 1)


def small_cache_forward_formula(n: int, d: int, cache_words: int) -> int:
    """gemm(n, d, n) + softmax (2n^2 + n, or 3n^2 + n if a row does not fit) + gemm(n, n, d)  ~ 4 sqrt(3) n^2 d / sqrt(M)."""
    b = small_cache_tile(cache_words)
    return tiled_gemm_formula(n, d, n, b) + _softmax_formula(n, n, cache_words) + tiled_gemm_formula(n, n, d, b)


def small_cache_backward_formula(n: int, d: int, cache_words: int) -> int:
    """2 gemm(n, d, n) + 3 gemm(n, n, d) + 5n^2 + 2nd + 3n  ~ 10 sqrt(3) n^2 d / sqrt(M)."""
    b = small_cache_tile(cache_words)
    gemms = 2 * tiled_gemm_formula(n, d, n, b) + 3 * tiled_gemm_formula(n, n, d, b)
    return gemms + (2 * n * n + n) + (2 * n * d + n) + (3 * n * n + n)


def block_sparse_forward_formula(n: int, d: int, block_size: int, n_kept_blocks: int) -> int:
    """2nd + n + 2 b d nnz  (b divides n; nnz = kept b x b blocks of one head)."""
    return 2 * n * d + n + 2 * block_size * d * n_kept_blocks


def block_sparse_backward_formula(n: int, d: int, block_size: int, n_kept_blocks: int) -> int:
    """7nd + n + nnz (4 b d + 2 b)  (b divides n)."""
    return 7 * n * d + n + n_kept_blocks * (4 * block_size * d + 2 * block_size)


# ---------------------------------------------------------------- lower bounds (constant 1: the papers give Theta only)
def lower_bound_forward(n: int, d: int, cache_words: int) -> float:
    """min{n^2 d^2 / M, n^2 d / sqrt(M)} (Saha & Ye 2024, forward), constant taken as 1."""
    m = float(cache_words)
    return min(n * n * d * d / m, n * n * d / math.sqrt(m))


def lower_bound_backward(n: int, d: int, cache_words: int) -> float:
    """min{(n^2 d^2 + n d^3) / M, (n^2 d + n d^2) / sqrt(M)} ("Fine-grained Attention I/O Complexity", Thm 4.1-4.4), constant taken as 1."""
    m = float(cache_words)
    return min((n * n * d * d + n * d**3) / m, (n * n * d + n * d * d) / math.sqrt(m))


def lower_bound_sparse(z_in: float, z_qk: float, cache_words: int) -> float:
    """Reconstructed sparse bound [R/I]: min{Z_in^2 / M, Z_in sqrt(Z_QK) / sqrt(M)}, constant 1.

    Args:
        z_in: nonzeros of the input matrices (dense: n d).
        z_qk: nonzeros of the attention-score matrix (dense: n^2).
    """
    m = float(cache_words)
    return min(z_in * z_in / m, z_in * math.sqrt(z_qk) / math.sqrt(m))
