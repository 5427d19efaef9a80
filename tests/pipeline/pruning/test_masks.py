"""Mask builders: exact counts, N:M groups (odd widths), deterministic ties, against brute-force oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.pruning.masks import apply_mask_, count_zeros, nm_mask, num_pruned, unstructured_mask


@pytest.mark.parametrize("shape", [(7, 13), (1, 5), (5, 1), (16, 32)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_per_matrix_matches_oracle(shape, sparsity):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keep = unstructured_mask(s, sparsity, per_row=False)
    k = math.floor(sparsity * s.numel() + 1e-9)
    assert int((~keep).sum()) == k
    # oracle: the k smallest scores of the whole matrix are exactly the pruned ones
    order = np.argsort(s.flatten().numpy(), kind="stable")
    expect = np.ones(s.numel(), dtype=bool)
    expect[order[:k]] = False
    assert np.array_equal(keep.flatten().numpy(), expect)


@pytest.mark.parametrize("shape", [(7, 13), (3, 9)])
def test_unstructured_per_row_exact_per_row(shape):
    s = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    keep = unstructured_mask(s, 0.4, per_row=True)
    k = math.floor(0.4 * shape[1])
    assert ((~keep).sum(1) == k).all()
    for r in range(shape[0]):  # each row prunes its own k smallest
        pruned = set(torch.where(~keep[r])[0].tolist())
        assert pruned == set(torch.argsort(s[r], stable=True)[:k].tolist())


def test_ties_are_deterministic_lower_index_pruned_first():
    s = torch.ones(2, 6)
    keep = unstructured_mask(s, 0.5, per_row=True)
    assert keep.tolist() == [[False, False, False, True, True, True]] * 2
    keep_nm = nm_mask(torch.ones(1, 8), 2, 4)
    assert keep_nm.tolist() == [[True, True, False, False, True, True, False, False]]


@pytest.mark.parametrize("n,m,cols", [(2, 4, 16), (2, 4, 13), (1, 4, 10), (4, 8, 21), (3, 4, 7)])
def test_nm_mask_groups_and_tail(n, m, cols):
    s = torch.randn(5, cols, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    keep = nm_mask(s, n, m)
    for r in range(5):
        for g0 in range(0, cols, m):
            grp = s[r, g0 : g0 + m]
            width = grp.numel()
            n_keep = n if width == m else math.ceil(n * width / m)
            kept = keep[r, g0 : g0 + m]
            assert int(kept.sum()) == n_keep
            # the kept entries are the largest scores of the group
            assert set(torch.where(kept)[0].tolist()) == set(torch.argsort(grp, descending=True)[:n_keep].tolist())


def test_apply_mask_and_count_zeros():
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 25, dtype=torch.float32).reshape(4, 6))
    mask = unstructured_mask(lin.weight.detach().abs(), 0.25, per_row=False)
    apply_mask_(lin.weight.data, mask)
    assert count_zeros(lin, ["weight"]) == {"weight": (6, 24)}
    assert lin.weight.data.flatten()[:6].eq(0).all() and lin.weight.data.flatten()[6:].ne(0).all()
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        apply_mask_(lin.weight.data, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(KeyError, match="nope"):
        count_zeros(lin, ["nope"])


def test_bad_arguments_quote_values():
    with pytest.raises(ValueError, match=r"1.5"):
        num_pruned(10, 1.5)
    with pytest.raises(ValueError, match="n=5"):
        nm_mask(torch.ones(2, 8), 5, 4)
    with pytest.raises(ValueError, match="2-D"):
        unstructured_mask(torch.ones(8), 0.5, per_row=True)
