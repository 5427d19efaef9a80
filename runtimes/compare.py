"""Output comparison: collect every output's metrics, then let the caller raise once.

Lesson from optimum's ``_run_validation``: check every output and report all failures in
one table instead of stopping at the first. Metrics per output:

- ``max_abs_diff`` and ``max_rel_diff`` (``|got - ref| / max(|ref|, tiny)``);
- ``cosine_min``: cosine similarity per row, where a row is the last axis (all leading
  axes flattened), minimum over rows; scale-free, so it catches collapse that a loose
  atol would miss;
- ``sqnr_db``: ``20 * log10(||ref|| / ||ref - got||)`` (torchao's ``compute_error``).

With a ``mask`` of shape (B, S), outputs whose leading axes are (B, S) are compared only
on valid (mask != 0) positions: padded positions carry no meaning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["Comparison", "compare", "comparison_table"]

_TINY = 1e-12


@dataclass(frozen=True)
class Comparison:
    """Result for one named output.

    Attributes:
        name: output name.
        shape_ok: shapes match (and the output exists on both sides).
        max_abs_diff: max ``|got - ref|`` over compared elements (``inf`` on shape mismatch or non-finite).
        max_rel_diff: max ``|got - ref| / max(|ref|, 1e-12)``.
        cosine_min: minimum per-row cosine similarity (``nan`` if not computed).
        sqnr_db: signal-to-quantization-noise ratio in dB (``inf`` when identical).
        ok: passes atol/rtol and, if requested, ``min_cosine``.
    """

    name: str
    shape_ok: bool
    max_abs_diff: float
    max_rel_diff: float
    cosine_min: float
    sqnr_db: float
    ok: bool


def _valid_rows(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Return ``arr`` as (rows, last_dim) float64, keeping only valid positions under ``mask``."""
    a = arr.astype(np.float64)
    if mask is not None and a.ndim >= 3 and a.shape[:2] == mask.shape:
        a = a[mask.astype(bool)]  # (B, S, ..., D) -> (n_valid, ..., D)
    if a.ndim == 0:
        return a.reshape(1, 1)
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])  # (rows, D): cosine per row; -1 fails when D = 0


def _cosine_min(ref: np.ndarray, got: np.ndarray) -> float:
    """Minimum row-wise cosine of two (rows, D) float64 arrays; rows where both are zero count as 1."""
    if ref.shape[0] == 0:  # no rows (e.g. everything masked): undefined; zero-width rows are both-zero rows
        return float("nan")
    num = np.sum(ref * got, axis=-1)
    den = np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1)
    both_zero = (np.linalg.norm(ref, axis=-1) == 0) & (np.linalg.norm(got, axis=-1) == 0)
    cos = np.where(both_zero, 1.0, num / np.maximum(den, _TINY))
    return float(np.min(cos))


def _compare_one(
    name: str,
    ref: np.ndarray,
    got: np.ndarray,
    atol: float,
    rtol: float,
    min_cosine: float | None,
    mask: np.ndarray | None,
) -> Comparison:
    if ref.shape != got.shape:
        return Comparison(name, False, math.inf, math.inf, float("nan"), -math.inf, False)
    r = _valid_rows(ref, mask)
    g = _valid_rows(got, mask)
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(r))):
        # NaN/inf (e.g. fp16 overflow) must never pass: the NaN comparisons below would be False anyway,
        # but report them as inf so the table is readable.
        return Comparison(name, True, math.inf, math.inf, float("nan"), -math.inf, False)
    diff = np.abs(g - r)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(r), _TINY)).max()) if diff.size else 0.0
    noise = float(np.linalg.norm(r - g))
    sqnr = math.inf if noise == 0.0 else 20.0 * math.log10(max(float(np.linalg.norm(r)), _TINY) / noise)
    cos = _cosine_min(r, g)
    ok = bool(np.all(diff <= atol + rtol * np.abs(r)))
    if min_cosine is not None:
        ok = ok and not math.isnan(cos) and cos >= min_cosine
    return Comparison(name, True, max_abs, max_rel, cos, sqnr, ok)


def compare(
    ref: Mapping[str, np.ndarray],
    got: Mapping[str, np.ndarray],
    *,
    atol: float,
    rtol: float = 0.0,
    min_cosine: float | None = None,
    mask: np.ndarray | None = None,
) -> list[Comparison]:
    """Compare every output in ``ref`` with the same-named output in ``got``.

    Element check: ``|got - ref| <= atol + rtol * |ref|`` everywhere (numpy ``allclose``
    semantics). Outputs present in ``ref`` but missing from ``got`` get a failing row.

    Args:
        ref: reference outputs (e.g. PyTorch fp32), ``name -> array``.
        got: outputs under test.
        atol: absolute tolerance.
        rtol: relative tolerance.
        min_cosine: if given, every output's ``cosine_min`` must reach it.
        mask: optional (B, S) attention mask; outputs with leading axes (B, S) are compared
            on valid positions only.

    Returns:
        One :class:`Comparison` per reference output, in ``ref`` order; the caller decides
        whether to raise (one error with :func:`comparison_table`).

    Raises:
        ValueError: negative tolerances or ``min_cosine`` outside [-1, 1].
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol and rtol must be >= 0, got atol={atol!r}, rtol={rtol!r}")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine!r}")
    m = None if mask is None else np.asarray(mask)
    if m is not None and m.ndim != 2:
        raise ValueError(f"mask must be (B, S), got shape {m.shape}")
    rows: list[Comparison] = []
    for name, r in ref.items():
        if name not in got:
            rows.append(Comparison(name, False, math.inf, math.inf, float("nan"), -math.inf, False))
            continue
        rows.append(_compare_one(name, np.asarray(r), np.asarray(got[name]), atol, rtol, min_cosine, m))
    return rows


def comparison_table(rows: Iterable[Comparison]) -> str:
    """Render comparisons as a markdown table (one row per output)."""
    lines = [
        "| output | shape ok | max abs diff | max rel diff | cosine min | SQNR dB | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.name} | {'yes' if c.shape_ok else 'NO'} | {c.max_abs_diff:.3g} | {c.max_rel_diff:.3g} "
            f"| {c.cosine_min:.6f} | {c.sqnr_db:.1f} | {'ok' if c.ok else 'FAIL'} |"
        )
    return "\n".join(lines)
