"""Block-mask builders."""

from __future__ import annotations

import pytest
import torch

from pipeline.kernels import block_masks as bm


def test_sliding_window_causal_and_not():
    m = bm.sliding_window(4, 4, 1, causal=True)[0, 0]
    assert m.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [False, True, True, False],
        [False, False, True, True],
    ]
    assert bm.sliding_window(4, 4, 1)[0, 0].sum() == 10
    # Nq < Nk: the diagonal is bottom-right aligned (last query block sees the last key block)
    assert bm.sliding_window(2, 4, 0, causal=True)[0, 0].tolist() == [
        [False, False, True, False],
        [False, False, False, True],
    ]


def test_global_and_dilated():
    g = bm.global_tokens(4, 4, 1)[0, 0]
    assert g[:, 0].all() and g[0, :].all() and g.sum() == 7
    d = bm.dilated(5, 5, 2, causal=True)[0, 0]
    assert d.tolist()[4] == [True, False, True, False, True]
    assert not d.triu(1).any()


def test_from_token_mask_and_density():
    tok = torch.ones(10, 10, dtype=torch.bool).tril()  # causal token mask, 10 not a multiple of 4
    blk = bm.from_token_mask(tok, 4)
    assert blk.shape == (1, 1, 3, 3)
    assert blk[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert bm.density(blk) == pytest.approx(6 / 9)
    r = bm.random_blocks(64, 64, 0.25, generator=torch.Generator().manual_seed(0))
    assert abs(bm.density(r) - 0.25) < 0.05


def test_builders_validate():
    with pytest.raises(ValueError, match="-1"):
        bm.sliding_window(4, 4, -1)
    with pytest.raises(ValueError, match="0"):
        bm.dilated(4, 4, 0)
    with pytest.raises(ValueError, match="float32"):
        bm.from_token_mask(torch.ones(3, 3), 2)
