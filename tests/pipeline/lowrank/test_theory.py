"""Theory checks of the polynomial method (notes §0 T1, T2; §1 (c), (d)): features, bounds, degrees, scaling."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.lowrank import (
    PolyFeatures,
    degree_for,
    degree_rule,
    feature_count,
    lowrank_attention,
    poly_attention_ref,
    softmax_attention_ref,
    taylor_error_bound,
)
from tests.pipeline.lowrank.common import uniform as _uniform


@pytest.mark.parametrize("d, g", [(1, 5), (3, 8), (5, 3)])
def test_features_give_the_taylor_polynomial(d, g):
    x, y = _uniform((7, d), 0.9, 0), _uniform((11, d), 0.9, 1)
    f = PolyFeatures(d, g)
    assert f.k == feature_count(d, g) == math.comb(d + g, g)
    dot = x @ y.T
    taylor = sum(dot**j / math.factorial(j) for j in range(g + 1))
    torch.testing.assert_close(f(x) @ f(y).T, taylor, rtol=1e-13, atol=1e-13)


def test_feature_count_table_of_the_notes():
    assert feature_count(3, 8) == 165
    assert [feature_count(4, g) for g in (5, 10)] == [126, 1001]


def test_kernel_error_is_below_the_bound_and_decays_with_degree():
    d, n = 4, 23
    q, k = _uniform((n, d), 0.9, 2), _uniform((n, d), 0.9, 3)
    s = 1.0 / math.sqrt(d)
    logits = s * q @ k.T
    beta = logits.abs().max().item()
    errs = []
    for g in range(1, 9):
        f = PolyFeatures(d, g)
        approx = f(q * math.sqrt(s)) @ f(k * math.sqrt(s)).T
        err = (approx / torch.exp(logits) - 1).abs().max().item()
        assert err <= taylor_error_bound(beta, g)
        errs.append(err)
    assert all(b < a for a, b in itertools.pairwise(errs))  # strictly decaying
    assert errs[-1] < 1e-5 * errs[0]


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 4.0, 9.0])
@pytest.mark.parametrize("eps", [1e-3, 1e-6])
def test_degree_rule_suffices_and_search_is_minimal(beta, eps):
    rule, g = degree_rule(beta, eps), degree_for(beta, eps)
    assert taylor_error_bound(beta, rule) <= eps
    assert g <= rule and taylor_error_bound(beta, g) <= eps
    assert g == 0 or taylor_error_bound(beta, g - 1) > eps


def test_bad_arguments():
    with pytest.raises(ValueError):
        degree_rule(1.0, 0.0)
    with pytest.raises(ValueError):
        taylor_error_bound(-1.0, 2)
    with pytest.raises(ValueError):
        PolyFeatures(0, 2)


@pytest.mark.parametrize("causal", [False, True])
def test_output_error_is_below_2eps_over_1_minus_eps_times_vmax(causal):
    b, h, n, d = 2, 3, 29, 4
    q, k, v = _uniform((b, h, n, d), 0.6, 4), _uniform((b, h, n, d), 0.6, 5), _uniform((b, h, n, d), 3.0, 6)
    beta = (q @ k.transpose(-1, -2) / math.sqrt(d)).abs().max().item()
    exact = softmax_attention_ref(q, k, v, causal=causal)
    for g in (2, 3, 5):
        eps = taylor_error_bound(beta, g)
        assert eps < 1
        err = (lowrank_attention(q, k, v, degree=g, causal=causal) - exact).abs().max().item()
        assert err <= 2 * eps / (1 - eps) * v.abs().max().item()


def _slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def test_error_grows_like_B_squared_power_for_matrix_attention():
    """Small-logit regime: kernel error ~ beta^(g+1)/(g+1)!, beta ~ B^2, so log-log slope in B is 2(g+1)."""
    d, n, g = 4, 17, 3
    base_q, base_k = _uniform((n, d), 1.0, 7), _uniform((n, d), 1.0, 8)
    bs = [0.05, 0.1, 0.2]
    errs = []
    for bnd in bs:
        q, k = base_q * bnd, base_k * bnd
        f = PolyFeatures(d, g)
        errs.append((f(q) @ f(k).T / torch.exp(q @ k.T) - 1).abs().max().item())
    assert _slope(bs, errs) == pytest.approx(2 * (g + 1), rel=0.05)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("causal", [False, True])
def test_fast_gradient_work_is_linear_in_n_and_exact_is_quadratic(causal):
    """Deterministic stand-in for wall time: counted floating-point work at n, 2n, 4n (fixed degree)."""
    d, g, ns = 4, 3, [256, 512, 1024]

    def fast(n):
        q, k, v = (_uniform((1, 2, n, d), 0.5, i).requires_grad_() for i in range(3))
        return _flops(lambda: lowrank_attention(q, k, v, degree=g, causal=causal, chunk=32).sum().backward())

    def exact(n):
        q, k, v = (_uniform((1, 2, n, d), 0.5, i).requires_grad_() for i in range(3))
        return _flops(lambda: softmax_attention_ref(q, k, v, causal=causal).sum().backward())

    assert _slope(ns, [fast(n) for n in ns]) == pytest.approx(1.0, abs=0.05)
    assert _slope(ns, [exact(n) for n in ns]) == pytest.approx(2.0, abs=0.05)


def test_factorized_forward_equals_the_dense_polynomial_kernel_with_gqa_and_padding():
    b, hq, hkv, n, d = 2, 4, 2, 37, 3
    q, k, v = _uniform((b, hq, n, d), 1.0, 9), _uniform((b, hkv, n, d), 1.0, 10), _uniform((b, hkv, n, d), 1.0, 11)
    key_mask = torch.ones(b, n, dtype=torch.bool)
    key_mask[1, -6:] = False
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    for causal in (False, True):
        got = lowrank_attention(q, k, v, degree=4, causal=causal, key_mask=key_mask, chunk=8)
        want = poly_attention_ref(q, ke, ve, degree=4, causal=causal, key_mask=key_mask)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
