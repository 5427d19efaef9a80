"""Attention planner: picks the kernel whose counted I/O is smallest, in both regimes."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.kernels import cache_words_from_bytes, plan_attention
from pipeline.kernels import io_model as io


def test_cache_words_from_bytes():
    assert cache_words_from_bytes(512 * 1024) == 131072
    assert cache_words_from_bytes(512 * 1024, word_bytes=2) == 262144
    with pytest.raises(ValueError, match="-1"):
        cache_words_from_bytes(-1)


def test_large_cache_picks_flash_with_a_fitting_tiling():
    p = plan_attention(cache_words=131072, seq=4096, head_dim=64)
    assert p.algorithm == "flash"
    assert p.peak_working_words <= p.cache_words
    # the prediction is the exact FA2 count for the chosen blocks, and no worse than the default rule
    assert p.predicted_io_words == io.fa2_forward_formula(4096, 64, 131072, blocks=(p.block_q, p.block_k))
    assert p.predicted_io_words <= io.fa2_forward_formula(4096, 64, 131072)
    assert p.predicted_io_words < io.small_cache_forward_formula(4096, 64, 131072)
    assert p.ratio == pytest.approx(p.predicted_io_words / p.lower_bound_words)
    assert p.lower_bound_words == pytest.approx(io.lower_bound_forward(4096, 64, 131072))


def test_small_cache_picks_tiled_gemm():
    p = plan_attention(cache_words=2048, seq=4096, head_dim=256)  # M = d^2 / 32
    assert p.algorithm == "small_cache"
    assert p.block_q == p.block_k == io.small_cache_tile(2048)
    assert 3 * p.block_q**2 <= 2048 == p.cache_words
    assert p.predicted_io_words == io.small_cache_forward_formula(4096, 256, 2048)


def test_choice_switches_once_near_d_squared():
    d, n = 128, 4096
    algos = [plan_attention(cache_words=int(d * d * 2 ** (k / 2)), seq=n, head_dim=d).algorithm for k in range(-8, 9)]
    first_flash = algos.index("flash")
    assert all(a == "small_cache" for a in algos[:first_flash])
    assert all(a == "flash" for a in algos[first_flash:])
    assert 2 ** ((first_flash - 8) / 2) <= 4  # switches at M <= 4 d^2 (Theta(d^2))
    assert 2 ** ((first_flash - 8) / 2) >= 1 / 16


def test_causal_counts_fewer_words():
    dense = plan_attention(cache_words=65536, seq=4096, head_dim=64)
    causal = plan_attention(cache_words=65536, seq=4096, head_dim=64, causal=True)
    assert causal.algorithm == "flash"
    assert causal.predicted_io_words < 0.7 * dense.predicted_io_words


def test_density_selects_block_sparse():
    p = plan_attention(cache_words=65536, seq=4096, head_dim=64, density=0.25)
    assert p.algorithm == "block_sparse"
    assert p.peak_working_words <= 65536
    nb = -(-4096 // p.block_q)
    assert p.predicted_io_words == io.block_sparse_forward_formula(4096, 64, p.block_q, round(0.25 * nb * nb))
    dense = plan_attention(cache_words=65536, seq=4096, head_dim=64, density=1.0)
    assert p.predicted_io_words < dense.predicted_io_words


def test_plan_is_frozen_and_validates():
    p = plan_attention(cache_words=65536, seq=128, head_dim=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.algorithm = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="1.5"):
        plan_attention(cache_words=65536, seq=128, head_dim=64, density=1.5)
    with pytest.raises(ValueError, match="0"):
        plan_attention(cache_words=0, seq=128, head_dim=64)


def test_io_slack_trades_a_few_words_for_wider_key_blocks():
    strict = plan_attention(cache_words=8192, seq=2048, head_dim=64, io_slack=0.0)
    loose = plan_attention(cache_words=8192, seq=2048, head_dim=64, io_slack=0.05)
    assert strict.predicted_io_words <= loose.predicted_io_words <= 1.05 * strict.predicted_io_words
    assert loose.block_k >= strict.block_k
    with pytest.raises(ValueError, match="-0.1"):
        plan_attention(cache_words=8192, seq=2048, head_dim=64, io_slack=-0.1)
