"""Tests for runtimes.compare against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtimes.compare import compare, comparison_table


def test_identical_outputs() -> None:
    x = np.random.default_rng(0).standard_normal((2, 5, 7)).astype(np.float32)
    (row,) = compare({"h": x}, {"h": x.copy()}, atol=0.0)
    assert row.ok and row.shape_ok and row.max_abs_diff == 0.0 and row.sqnr_db == math.inf
    assert row.cosine_min == pytest.approx(1.0)


def test_metrics_match_hand_computation() -> None:
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    got = np.array([[3.0, 4.5], [0.0, 1.0]])  # row 2 orthogonal: cosine 0
    (row,) = compare({"y": ref}, {"y": got}, atol=1.0)
    assert row.max_abs_diff == pytest.approx(1.0)
    assert row.max_rel_diff == pytest.approx(1.0 / 1e-12)  # |0 - 1| / max(|0|, tiny) on ref zero
    assert row.cosine_min == pytest.approx(0.0, abs=1e-12)
    noise = math.sqrt(0.25 + 1 + 1)
    assert row.sqnr_db == pytest.approx(20 * math.log10(math.sqrt(9 + 16 + 1) / noise))
    assert row.ok  # within atol=1.0 everywhere
    (strict,) = compare({"y": ref}, {"y": got}, atol=1.0, min_cosine=0.5)
    assert not strict.ok  # cosine catches what atol misses


def test_rtol_semantics() -> None:
    ref = np.array([100.0, 1.0])
    got = np.array([101.0, 1.001])
    assert not compare({"y": ref}, {"y": got}, atol=0.01)[0].ok
    assert compare({"y": ref}, {"y": got}, atol=0.01, rtol=0.011)[0].ok


def test_collects_all_failures_and_table() -> None:
    ref = {"a": np.ones((2, 3)), "b": np.ones((2, 3)), "c": np.ones(4)}
    got = {"a": np.ones((2, 3)), "b": np.ones((3, 2)), "c": np.array([1, 1, np.nan, 1])}
    rows = compare(ref, got | {"extra": np.ones(1)}, atol=1e-6)
    assert [(r.name, r.ok) for r in rows] == [("a", True), ("b", False), ("c", False)]
    assert not rows[1].shape_ok and rows[2].shape_ok and rows[2].max_abs_diff == math.inf
    missing = compare(ref, {"a": ref["a"]}, atol=1.0)
    assert [r.ok for r in missing] == [True, False, False]
    table = comparison_table(rows)
    assert table.count("\n") == 4 and "| b | NO |" in table and "FAIL" in table


def test_mask_ignores_padded_positions() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 4, 3))
    got = ref.copy()
    got[1, 3] = 1e6  # garbage at a padded position
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert not compare({"h": ref}, {"h": got}, atol=1e-6)[0].ok
    (row,) = compare({"h": ref}, {"h": got}, atol=1e-6, min_cosine=0.999, mask=mask)
    assert row.ok and row.max_abs_diff == 0.0
    # outputs whose leading axes are not (B, S), e.g. pooled (B, D), are compared whole
    (pooled,) = compare({"p": ref[:, 0]}, {"p": ref[:, 0]}, atol=0.0, mask=mask)
    assert pooled.ok


def test_bad_arguments_quote_value() -> None:
    x = {"y": np.zeros(2)}
    with pytest.raises(ValueError, match="-1"):
        compare(x, x, atol=-1)
    with pytest.raises(ValueError, match=r"1.5"):
        compare(x, x, atol=0, min_cosine=1.5)
