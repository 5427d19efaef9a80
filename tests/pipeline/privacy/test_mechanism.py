"""The DP cross-attention mechanism (pipeline.privacy): features, calibration, release, DPTree, accounting,
audits. numpy only, float64 oracles, odd sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.privacy.accounting import advanced_composition_epsilon, joint_delta, plan_gaussian
from pipeline.privacy.audit import adaptive_stream_unchanged, privacy_loss_audit, sensitivity_search, state_hash
from pipeline.privacy.calibration import (
    analytic_gaussian_sigma,
    check_privacy_params,
    classical_gaussian_sigma,
    gaussian_delta,
    gaussian_epsilon,
)
from pipeline.privacy.dptree import DPTree, DPTreeDistance, DPTreeSoftmax
from pipeline.privacy.features import feature_count, feature_norm_bound, kernel_error_bound, poly_features, taylor_exp
from pipeline.privacy.release import (
    KernelSpec,
    PublicBounds,
    exact_attention,
    exact_sums,
    release_feature_sum,
    replace_one_sensitivity,
)
from pipeline.privacy.sampler import SecureSampler, SeededSampler


def _data(n: int, d: int, dv: int, seed: int = 0):
    """Keys uniform in [-1, 1]^d; values depend on the keys (smooth function), in [-1, 1]."""
    rng = np.random.default_rng(seed)
    K = rng.uniform(-1, 1, (n, d))
    W = rng.normal(size=(d, dv))
    return K, np.tanh(K @ W)


@pytest.mark.parametrize("d,s,scale", [(3, 5, 0.7), (1, 7, 1.0), (5, 3, 1 / math.sqrt(5))])
def test_features_give_the_taylor_kernel(d, s, scale):
    rng = np.random.default_rng(d)
    x, y = rng.uniform(-1.3, 1.3, (7, d)), rng.uniform(-1.3, 1.3, (7, d))
    phi_x, phi_y = poly_features(x, s, scale), poly_features(y, s, scale)
    assert phi_x.shape == (7, feature_count(d, s)) == (7, math.comb(d + s, s))
    # float64 oracle: Σ_j (scale⟨x,y⟩)^j / j!
    t = scale * np.einsum("nd,nd->n", x, y)
    oracle = sum(t**j / math.factorial(j) for j in range(s + 1))
    np.testing.assert_allclose(np.einsum("nr,nr->n", phi_x, phi_y), oracle, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(taylor_exp(t, s), oracle, rtol=1e-12)


def test_feature_norm_bound_is_the_supremum_over_the_box():
    d, s, scale, R = 3, 4, 0.6, 1.2
    rng = np.random.default_rng(1)
    pts = rng.uniform(-R, R, (5000, d))
    bound = feature_norm_bound(d, s, scale, R)
    assert np.linalg.norm(poly_features(pts, s, scale), axis=1).max() <= bound * (1 + 1e-12)
    corner = np.full((1, d), -R)
    assert np.linalg.norm(poly_features(corner, s, scale)) == pytest.approx(bound, rel=1e-12)


def test_analytic_gaussian_is_tight_and_beats_the_classical_bound():
    for eps in (0.5, 1.0, 8.0, 16.0):
        s = analytic_gaussian_sigma(eps, 1e-5, 2.0)
        assert gaussian_delta(eps, s, 2.0) <= 1e-5
        assert gaussian_delta(eps, s * (1 - 1e-6), 2.0) > 1e-5
    assert 1 - analytic_gaussian_sigma(1.0, 1e-5) / classical_gaussian_sigma(1.0, 1e-5) == pytest.approx(0.23, abs=0.01)
    # the textbook σ is not (12, 1e-5)-DP: its true δ is ~5.9e-5
    assert gaussian_delta(12.0, classical_gaussian_sigma(12.0, 1e-5), 1.0) == pytest.approx(5.94e-5, rel=0.01)
    assert gaussian_epsilon(1 / analytic_gaussian_sigma(1.0, 1e-5), 1e-5) == pytest.approx(1.0, rel=1e-6)


def test_gaussian_delta_matches_a_numerical_integral_of_the_privacy_loss():
    # δ(ε) = E_{L ~ N(μ²/2, μ²)} [(1 − e^{ε − L})_+]  with μ = Δ/σ (float64 quadrature oracle)
    for mu, eps in ((0.7, 0.5), (2.0, 1.0), (4.0, 3.0)):
        L = np.linspace(mu**2 / 2 - 12 * mu, mu**2 / 2 + 12 * mu, 400001)
        pdf = np.exp(-((L - mu**2 / 2) ** 2) / (2 * mu**2)) / (mu * math.sqrt(2 * math.pi))
        oracle = np.trapezoid(np.clip(1 - np.exp(eps - L), 0, None) * pdf, L)
        assert gaussian_delta(eps, 1.0, mu) == pytest.approx(oracle, rel=1e-6)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-1.0), "epsilon"),
        (dict(epsilon=float("inf")), "epsilon"),
        (dict(epsilon=float("nan")), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(key_bound=None), "key_bound is missing"),
        (dict(value_bound=0.0), "value_bound"),
        (dict(epsilon="1"), "epsilon"),
    ],
)
def test_invalid_privacy_parameters_are_refused_in_one_line(kw, needle):
    args = dict(epsilon=1.0, delta=1e-5, key_bound=1.0, value_bound=1.0) | kw
    with pytest.raises(ConfigError) as ei:
        check_privacy_params(**args)
    assert needle in str(ei.value) and "\n" not in str(ei.value)
    if "key_bound" not in kw and "value_bound" not in kw:
        with pytest.raises(ConfigError):
            plan_gaussian(args["epsilon"], args["delta"], [1.0])


def test_noise_free_release_is_within_the_kernel_bound_and_clips_to_public_bounds():
    K, V = _data(301, 3, 2)
    spec, b = KernelSpec(3, 8, 1.0), PublicBounds(1.0, 1.0)
    q = np.random.default_rng(2).uniform(-0.5, 0.5, (37, 3))
    out, guarded = release_feature_sum(K, V, spec, b, 0.0).answer(q)
    beta = 1.5  # |⟨q,k⟩| ≤ d·0.5·R
    eps_s = kernel_error_bound(beta, 8)
    # notes §2(d) test 4 with the exact kernel bound: numerator and denominator each within relative ε_s
    bound = 2 * eps_s / (1 - eps_s) * 1.0
    assert not guarded.any()
    assert np.abs(out - exact_attention(q, K, V, 1.0)).max() <= bound
    # clipping happens inside the mechanism: rows beyond the bounds count as clipped rows
    K2, V2 = K.copy(), V.copy()
    K2[0], V2[0] = [9.0, -9.0, 0.5], [5.0, -5.0]
    Kc, Vc = K.copy(), V.copy()
    Kc[0], Vc[0] = [1.0, -1.0, 0.5], [1.0, -1.0]
    np.testing.assert_allclose(exact_sums(K2, V2, spec, b), exact_sums(Kc, Vc, spec, b), rtol=0, atol=0)


def test_sensitivity_search_stays_below_the_bound_and_finds_the_worst_corner_pair():
    from itertools import product

    for d, s, dv in ((2, 4, 2), (3, 3, 1), (1, 5, 3)):
        spec, b = KernelSpec(d, s, 1 / math.sqrt(d)), PublicBounds(1.5, 0.8)
        res = sensitivity_search(spec, b, dv, trials=800)
        assert res.bound == pytest.approx(replace_one_sensitivity(spec, b, dv))
        assert res.ratio <= 1.0 + 1e-12
        # exhaustive oracle over all corner pairs (keys and values at ±bound)
        ks = [np.array(c) * 1.5 for c in product((-1.0, 1.0), repeat=d)]
        vs = [np.array(c) * 0.8 for c in product((-1.0, 1.0), repeat=dv)]
        blocks = [np.outer(poly_features(k, s, spec.scale), np.r_[v, 1]) for k in ks for v in vs]
        best = max(np.linalg.norm(x - y) for x in blocks for y in blocks)
        assert res.found >= best * (1 - 1e-9)
        # the reported pair really reaches the reported difference
        diff = np.outer(poly_features(res.k, s, spec.scale), np.r_[res.v, 1]) - np.outer(
            poly_features(res.k2, s, spec.scale), np.r_[res.v2, 1]
        )
        assert np.linalg.norm(diff) == pytest.approx(res.found, rel=1e-12)


def test_error_times_n_times_epsilon_is_roughly_constant():
    """notes §2(d) test 3: on synthetic keys (d = 2, values depend on keys) the DP error scales as 1/(n·ε)."""
    spec, b = KernelSpec(2, 5, 1.0), PublicBounds(1.0, 1.0)
    q = np.random.default_rng(7).uniform(-1, 1, (64, 2))
    products = []
    for n in (1024, 4096, 16384):
        K, V = _data(n, 2, 2, seed=n)
        ex = exact_attention(q, K, V, 1.0)
        S_kernel_err = np.abs(release_feature_sum(K, V, spec, b, 0.0).answer(q)[0] - ex).mean()
        for eps in (1.0, 4.0):
            sigma = plan_gaussian(eps, 1e-5, [replace_one_sensitivity(spec, b, 2)]).sigmas[0]
            errs = [
                np.abs(release_feature_sum(K, V, spec, b, sigma, SeededSampler(100 * i + n)).answer(q)[0] - ex).mean()
                for i in range(24)
            ]
            assert S_kernel_err < 0.1 * np.mean(errs)  # the noise, not the kernel, dominates
            products.append(n * eps * float(np.mean(errs)))
    assert max(products) / min(products) < 1.6, products


def test_noise_is_drawn_once_and_adaptive_queries_leave_the_state_unchanged():
    K, V = _data(513, 2, 2)
    rel = release_feature_sum(K, V, KernelSpec(2, 4, 1.0), PublicBounds(1.0, 1.0), 5.0)
    q = np.array([[0.3, -0.2]])
    first = rel.answer(q)[0]
    np.testing.assert_array_equal(first, rel.answer(q)[0])
    unchanged, h0, h1 = adaptive_stream_unchanged(
        rel.state_hash, lambda x: rel.answer(np.clip(x, -1, 1))[0], q, steps=50
    )
    assert unchanged and h0 == h1 == state_hash([rel.sums])
    assert rel.sampler.startswith("os.urandom")


def test_secure_sampler_distribution_and_unpredictability():
    s = SecureSampler()
    z = s.normal((200_001,), 2.0)
    assert abs(z.mean()) < 0.03 and z.std() == pytest.approx(2.0, rel=0.01)
    lap = s.laplace((200_001,), 1.5)
    assert abs(lap.mean()) < 0.03 and lap.var() == pytest.approx(2 * 1.5**2, rel=0.03)
    u = s.uniform(100_000)
    assert u.min() > 0 and u.max() < 1
    assert not np.array_equal(s.normal((8,), 1.0), s.normal((8,), 1.0))


def test_privacy_audit_passes_the_release_and_flags_the_broken_control():
    spec, b = KernelSpec(2, 4, 1.0), PublicBounds(1.0, 1.0)
    worst = sensitivity_search(spec, b, 2, trials=400)
    K, V = _data(257, 2, 2)
    Ka, Va, Kb, Vb = K.copy(), V.copy(), K.copy(), V.copy()
    Ka[0], Va[0], Kb[0], Vb[0] = worst.k, worst.v, worst.k2, worst.v2
    Sa, Sb = exact_sums(Ka, Va, spec, b), exact_sums(Kb, Vb, spec, b)
    for eps in (0.5, 4.0):
        sigma = plan_gaussian(eps, 1e-5, [worst.bound] * 3).sigmas[0]
        good = privacy_loss_audit(Sa, Sb, sigma, eps, 1e-5, releases=3, trials=1000, repeats=64)
        bad = privacy_loss_audit(Sa, Sb, sigma, eps, 1e-5, releases=3, trials=1000, repeats=64, redraw_per_query=True)
        assert not good.flagged and good.epsilon_lower < eps
        assert bad.flagged and bad.epsilon_lower > eps


def test_joint_accounting_is_exact_and_basic_is_looser():
    sens = [3.0, 3.0, 5.0, 1.0]
    joint = plan_gaussian(1.0, 1e-5, sens)
    basic = plan_gaussian(1.0, 1e-5, sens, "basic")
    assert joint.exact_delta == pytest.approx(1e-5, rel=1e-6)
    assert basic.exact_delta < 1e-5
    assert all(bs > js for bs, js in zip(basic.sigmas, joint.sigmas))
    assert joint_delta(1.0, joint.sigmas, sens) == pytest.approx(joint.exact_delta)
    # a single release: the joint plan is the analytic Gaussian itself
    assert plan_gaussian(2.0, 1e-6, [4.0]).sigmas[0] == pytest.approx(analytic_gaussian_sigma(2.0, 1e-6, 4.0))
    e1 = advanced_composition_epsilon(1.0, 1e-5, 10)
    assert math.sqrt(2 * 10 * math.log(1e5)) * e1 + 10 * e1 * math.expm1(e1) == pytest.approx(1.0, rel=1e-9)


def test_dptree_range_queries_are_unbiased_and_calibrated():
    """notes §2(d) test 2: range-query error std ≈ sqrt(2·#nodes)·b."""
    leaves = np.arange(1000, dtype=np.float64) % 7
    lo, hi = 3, 777
    trees = DPTree(np.broadcast_to(leaves, (4000, 1000)), 1.0, 1.0, SeededSampler(3))
    nodes = trees.canonical_nodes(lo, hi)
    covered = sorted(j for lvl, i in nodes for j in range(i * 2**lvl, (i + 1) * 2**lvl))
    assert covered == list(range(lo, hi + 1))
    err = trees.query(lo, hi) - leaves[lo : hi + 1].sum()
    assert trees.scale == pytest.approx(1.0 * (trees.L + 1) / 1.0)
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(4000)
    assert err.std() == pytest.approx(math.sqrt(2 * len(nodes)) * trees.scale, rel=0.05)


def test_dptree_distance_and_softmax_structures():
    rng = np.random.default_rng(5)
    x, w = rng.uniform(-1, 1, 301), rng.uniform(-1, 1, 301)
    dist = DPTreeDistance(x, w, 1.0, 1.0, 1e9, bins=4096, sampler=SeededSampler(0))
    for y in (-0.7, 0.05, 0.9):
        assert dist.l2sq(y) == pytest.approx(float((w * (y - x) ** 2).sum()), abs=1e-5)
        # ℓ1 splits at y's bin: at most 2·binwidth·Σ|w in that bin| off
        assert dist.l1(y) == pytest.approx(float((w * np.abs(y - x)).sum()), abs=2 * (2 / 4096) * 2 + 1e-5)
    K, V = _data(211, 2, 3)
    spec, b = KernelSpec(2, 6, 1.0), PublicBounds(1.0, 1.0)
    q = rng.uniform(-1, 1, (13, 2))
    tree = DPTreeSoftmax(K, V, spec, b, 1.0, 1e-5, sampler=SeededSampler(1))
    np.testing.assert_allclose(tree.answer(q)[0], tree.answer_via_sums(q)[0], atol=1e-9)
    quiet = DPTreeSoftmax(K, V, spec, b, 1.0, 1e-5, bins=8, sampler=_ZeroSampler())
    np.testing.assert_allclose(quiet.effective_sums(), exact_sums(K, V, spec, b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(quiet.answer(q)[0], release_feature_sum(K, V, spec, b, 0.0).answer(q)[0], atol=1e-12)
    # the noisy structure spends its budget over r·(d_v+1) structures: per-node Laplace scale 3·2·(L+1)/ε'
    eps_each = advanced_composition_epsilon(1.0, 1e-5, spec.r * 4)
    assert tree.dist.T_S.scale == pytest.approx(2 * max(b.value_bound, 1.0) * (tree.dist.T_S.L + 1) / (eps_each / 3))


class _ZeroSampler:
    """Noise switched off: checks the structures' algebra, not their privacy."""

    name = "zero"

    def normal(self, shape, sigma):
        return np.zeros(shape)

    def laplace(self, shape, scale):
        return np.zeros(shape)
