"""Theory checks of the merged-W mask objective (notes §A(c)-(d)), all in float64."""

from __future__ import annotations

import math

import pytest
import torch

from tests.pipeline.pruning.attention_theory import (
    binarize_scores,
    estimate_lipschitz,
    mask_grad,
    mask_loss,
    merged_attention,
    optimize_mask,
)

DT = torch.float64


def _problem(B: int = 2, n: int = 7, d: int = 5, w_scale: float = 0.6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, d, generator=g, dtype=DT)
    W = w_scale * torch.randn(d, d, generator=g, dtype=DT)
    pad = torch.ones(B, n, dtype=torch.bool)
    pad[-1, n - 2 :] = False  # right padding on the last sequence
    return X, W, pad


@pytest.mark.parametrize("causal", [False, True])
def test_closed_form_gradient_matches_autograd(causal: bool) -> None:
    X, W, pad = _problem()
    M = 1.0 + 0.3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    Mv = M.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(mask_loss(Mv, W, X, lam=0.3, causal=causal, pad_mask=pad), Mv)
    closed = mask_grad(M, W, X, lam=0.3, causal=causal, pad_mask=pad)
    assert float((closed - auto).norm() / auto.norm()) < 1e-10


def test_closed_form_gradient_matches_gradcheck() -> None:
    X, W, pad = _problem(n=5, d=4)
    M = torch.ones_like(W) * 0.8
    assert torch.autograd.gradcheck(
        lambda m: mask_loss(m, W, X, lam=0.2, causal=True, pad_mask=pad), (M.clone().requires_grad_(True),)
    )


def test_padded_queries_and_keys_excluded() -> None:
    X, W, pad = _problem()
    F = merged_attention(X, W, causal=False, pad_mask=pad)
    assert torch.all(F[-1, -2:] == 0)  # padded query rows dropped from the loss
    assert torch.all(F[-1, :, -2:] == 0)  # padded keys never attended
    assert torch.allclose(F[-1, :-2].sum(-1), torch.ones(5, dtype=DT))


def test_all_ones_mask_loss_and_gradient() -> None:
    X, W, pad = _problem()
    d = W.shape[0]
    M = torch.ones_like(W)
    lam = 0.37
    assert math.isclose(float(mask_loss(M, W, X, lam=lam, causal=True, pad_mask=pad)), lam / 2 * d * d, rel_tol=1e-12)
    assert torch.allclose(
        mask_grad(M, W, X, lam=lam, causal=True, pad_mask=pad), lam * torch.ones_like(W), rtol=0, atol=1e-12
    )


def test_lambda_zero_prunes_nothing() -> None:
    """With λ = 0, M = 1 is a global minimiser (loss 0); the solver never moves, so M stays all-ones and the mask
    carries no information: binarising |M∘W| degenerates to plain magnitude pruning of W."""
    X, W, pad = _problem()
    trace = optimize_mask(W, X, lam=0.0, causal=False, pad_mask=pad, solver="gd", steps=10, lr=0.5)
    assert torch.equal(trace.M, torch.ones_like(W))
    assert max(trace.losses) == 0.0
    keep = binarize_scores((trace.M * W).abs(), 0.5, granularity="matrix")
    assert torch.equal(keep, binarize_scores(W.abs(), 0.5, granularity="matrix"))


def test_lipschitz_power_iteration_matches_full_hessian() -> None:
    X, W, pad = _problem(n=6, d=4)
    M = torch.ones_like(W)
    H = torch.autograd.functional.hessian(lambda m: mask_loss(m, W, X, lam=0.1, causal=True, pad_mask=pad), M)
    eig = torch.linalg.eigvalsh(H.reshape(16, 16))
    L_true = float(eig.abs().max())
    L_hat = estimate_lipschitz(M, W, X, lam=0.1, causal=True, pad_mask=pad, iters=200)
    assert L_hat == pytest.approx(L_true, rel=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_gd_at_inverse_lipschitz_is_monotone(causal: bool) -> None:
    X, W, _ = _problem(B=3, n=12, d=6, w_scale=1.0, seed=2)
    trace = optimize_mask(W, X, lam=0.05, causal=causal, solver="gd", steps=60, safety=1.0)
    assert trace.lipschitz is not None and trace.step_size == pytest.approx(1 / trace.lipschitz)
    diffs = torch.tensor(trace.losses, dtype=DT).diff()
    assert torch.all(diffs <= 1e-12), diffs.max()
    assert trace.losses[-1] < 0.9 * trace.losses[0]


def test_gd_converges_linearly_pl() -> None:
    """PL + smoothness ⇒ L(M_t) − L* ≤ (1 − μ/L)^t (L(M_0) − L*): log-gap is ≈ linear in t."""
    X, W, _ = _problem(B=2, n=10, d=4, w_scale=1.0, seed=3)
    lam = 0.5  # strongly regularised: the PL constant μ ≥ λ − (curvature of the attention term) stays positive
    long = optimize_mask(W, X, lam=lam, causal=False, solver="gd", steps=1500, safety=1.0)
    L_star = long.losses[-1]
    gaps = torch.tensor(long.losses[:80], dtype=DT) - L_star
    assert torch.all(gaps > 0)
    t = torch.arange(5, 80, dtype=DT)
    y = gaps[5:80].log()
    A = torch.stack([t, torch.ones_like(t)], 1)
    coef = torch.linalg.lstsq(A, y[:, None]).solution.squeeze()
    resid = y - A @ coef
    r2 = 1 - float(resid.pow(2).sum() / (y - y.mean()).pow(2).sum())
    assert coef[0] < 0 and r2 > 0.99, (float(coef[0]), r2)
    # The rate cannot beat 1 − λ/L̂·(something ≤ 1): contraction per step is in (0, 1).
    rate = math.exp(float(coef[0]))
    assert 0 < rate < 1


def test_adam_matches_paper_mode_direction() -> None:
    """Adam on the same loss lowers it and shrinks M (λ > 0 drives sparsification); stop rule fires at mean M."""
    X, W, _ = _problem(B=2, n=8, d=5, seed=4)
    tr = optimize_mask(W, X, lam=1.0, causal=True, solver="adam", steps=200, lr=0.05, stop_mean_mask=0.5)
    assert tr.stopped_at is not None and float(tr.M.mean()) < 0.5
    assert tr.losses[-1] < tr.losses[0]


def test_binarize_exact_counts_and_nm() -> None:
    s = torch.randn(6, 12, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert int((~binarize_scores(s, 0.5, granularity="matrix")).sum()) == 36
    row = binarize_scores(s, 0.7, granularity="row")
    assert torch.all((~row).sum(1) == math.floor(0.7 * 12))
    nm = binarize_scores(s, 0.5, n=2, m=4)
    assert torch.all(nm.reshape(6, 3, 4).sum(-1) == 2)
    with pytest.raises(ValueError, match="sparsity"):
        binarize_scores(s, 1.0)
