"""The faithful merged-W form of "Beyond Linear Approximations" (arXiv 2410.11261), for theory and tests.

Setting (notes §A(a)-(c)): one head, calibration states ``X_b`` of shape ``(n, d)``, merged query-key weight
``W = scale · W_Q W_Kᵀ`` of shape ``(d, d)`` (the √d_h scaling folded in), a real-valued mask ``M`` (d, d)::

    F_b(M) = row_softmax(mask(X_b (M∘W) X_bᵀ))          # (n, n), causal/padding entries = 0
    L(M)   = ½ Σ_b ‖F_b(M) − F_b(1)‖²_F + (λ/2) ‖M‖²_F    # ½ and λ/2 constants are [I] in the notes

Closed-form gradient (notes §A(c), [R])::

    ∇L = W ∘ (Σ_b X_bᵀ Ψ_b X_b) + λ M,   Ψ = F ∘ (G − rowsum(F∘G) 1ᵀ),   G = F − F*

This module implements exactly that, with plain GD at step 1/L̂ (L̂ from power iteration on Hessian-vector
products at the start point, the notes' practical recipe) and Adam as the practical solver. It is the
reference the real-model pruner in :mod:`pipeline.pruning.attention_objective` is checked against; on real models
the merged W cannot reduce the parameter count (it is d×d per head), so that module puts masks on
``W_Q``/``W_K`` instead.

Padding: padded key columns are excluded from the softmax, padded query rows are excluded from the loss
(their rows of F and F* are zeroed, which makes their rows of Ψ zero, so the closed form needs no special case).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.pruning.masks import allowed_positions, binarize_scores  # noqa: F401  (re-exported for the tests)

__all__ = [
    "MaskTrace",
    "estimate_lipschitz",
    "mask_grad",
    "mask_loss",
    "masked_row_softmax",
    "merged_attention",
    "optimize_mask",
]

logger = logging.getLogger(__name__)


def masked_row_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Row softmax with −∞ at disallowed positions (max-subtracted by torch, no 0·exp overflow).

    Args:
        scores: (..., n, n) logits.
        allowed: broadcastable bool, True where the key may be attended.
    """
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def merged_attention(
    X: torch.Tensor, W: torch.Tensor, *, causal: bool, pad_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``F = row_softmax(mask(X W Xᵀ))`` for a batch, with padded query rows zeroed.

    Args:
        X: (B, n, d) hidden states.
        W: (d, d) merged, pre-scaled query-key weight.
        causal: decoder (True) or encoder (False) masking.
        pad_mask: (B, n) bool, True = real token.

    Returns:
        (B, n, n) attention with rows of padded queries set to 0.
    """
    B, n, _ = X.shape
    allowed, row_valid = allowed_positions(n, causal=causal, pad_mask=pad_mask, batch=B, device=X.device)
    S = X @ W @ X.transpose(1, 2)  # (B, n, n)
    return masked_row_softmax(S, allowed) * row_valid[:, :, None]


def mask_loss(
    M: torch.Tensor,
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    lam: float,
    causal: bool,
    pad_mask: torch.Tensor | None = None,
    F_star: torch.Tensor | None = None,
) -> torch.Tensor:
    """``L(M) = ½ Σ_b ‖F_b(M) − F_b*‖²_F + (λ/2)‖M‖²_F`` (sum over sequences, not mean).

    Args:
        M: (d, d) real-valued mask.
        W: (d, d) merged weight (scale folded in).
        X: (B, n, d) calibration states.
        lam: λ ≥ 0.
        causal: causal masking.
        pad_mask: (B, n) bool or None.
        F_star: (B, n, n) dense attention; computed from ``W`` when None.
    """
    if F_star is None:
        F_star = merged_attention(X, W, causal=causal, pad_mask=pad_mask)
    F = merged_attention(X, M * W, causal=causal, pad_mask=pad_mask)
    return 0.5 * (F - F_star).pow(2).sum() + 0.5 * lam * M.pow(2).sum()


def mask_grad(
    M: torch.Tensor,
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    lam: float,
    causal: bool,
    pad_mask: torch.Tensor | None = None,
    F_star: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed-form ``∇_M L = W ∘ (Σ_b X_bᵀ Ψ_b X_b) + λ M`` (no autograd).

    Args: as :func:`mask_loss`.

    Returns:
        (d, d) gradient.
    """
    if F_star is None:
        F_star = merged_attention(X, W, causal=causal, pad_mask=pad_mask)
    F = merged_attention(X, M * W, causal=causal, pad_mask=pad_mask)  # (B, n, n), padded rows 0
    G = F - F_star
    r = (F * G).sum(-1, keepdim=True)  # (B, n, 1): softmax VJP row term
    Psi = F * (G - r)  # (B, n, n); zero at masked positions since F is
    XtPsiX = (X.transpose(1, 2) @ Psi @ X).sum(0)  # (d, d)
    return W * XtPsiX + lam * M


def estimate_lipschitz(
    M: torch.Tensor,
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    lam: float,
    causal: bool,
    pad_mask: torch.Tensor | None = None,
    iters: int = 30,
    seed: int = 0,
) -> float:
    """Local smoothness L̂ = |λ_max(∇²L(M))| by power iteration on Hessian-vector products.

    The paper proves a global Lipschitz bound whose constants are not confirmed (notes §A(c)); the notes'
    practical recipe is this local estimate at the start point. Callers use a safety factor (η = 1/(c·L̂)).

    Args:
        M: (d, d) point at which the Hessian is taken.
        W, X, lam, causal, pad_mask: as :func:`mask_loss`.
        iters: power iterations.
        seed: seed of the random start vector.
    """
    F_star = merged_attention(X, W, causal=causal, pad_mask=pad_mask)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(M.shape, generator=gen, dtype=M.dtype).to(M.device)
    v = v / v.norm()
    est = 0.0
    for _ in range(iters):
        Mv = M.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(
            mask_loss(Mv, W, X, lam=lam, causal=causal, pad_mask=pad_mask, F_star=F_star), Mv, create_graph=True
        )
        (Hv,) = torch.autograd.grad(g, Mv, grad_outputs=v)  # (d, d) Hessian-vector product
        est = float(Hv.norm())
        if est == 0.0:
            break
        v = Hv / est
    return max(est, lam)


@dataclass
class MaskTrace:
    """Result of :func:`optimize_mask`.

    Attributes:
        M: (d, d) final (or early-stopped) real-valued mask.
        losses: L(M_t) for t = 0..steps (before each step, and the last point).
        step_size: η used by GD (None for Adam).
        lipschitz: L̂ used by GD (None for Adam).
        stopped_at: step at which early stopping fired, or None.
    """

    M: torch.Tensor
    losses: list[float] = field(default_factory=list)
    step_size: float | None = None
    lipschitz: float | None = None
    stopped_at: int | None = None


def optimize_mask(
    W: torch.Tensor,
    X: torch.Tensor,
    *,
    lam: float,
    causal: bool,
    pad_mask: torch.Tensor | None = None,
    solver: Literal["gd", "adam"] = "gd",
    steps: int = 100,
    lr: float | None = None,
    safety: float = 1.0,
    stop_mean_mask: float | None = None,
) -> MaskTrace:
    """Paper Algorithm 1 (GD on the real-valued mask, M₀ = 1) or Adam.

    Args:
        W: (d, d) merged weight.
        X: (B, n, d) calibration states.
        lam: λ > 0 (with λ = 0, M = 1 is a global minimiser and nothing moves).
        causal: causal masking.
        pad_mask: (B, n) bool or None.
        solver: "gd" = closed-form gradient with η = lr or 1/(safety·L̂); "adam" = torch Adam on the same loss.
        steps: iterations T.
        lr: step size; required for Adam, optional for GD (default 1/(safety·L̂)).
        safety: factor c ≥ 1 in η = 1/(c·L̂), because L̂ is local.
        stop_mean_mask: stop once mean(M) falls below this value (the loss minimiser is degenerate, M → 0
            flattens attention, so the mask only ranks well when stopped early); None runs all steps.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    F_star = merged_attention(X, W, causal=causal, pad_mask=pad_mask)
    M = torch.ones_like(W)
    trace = MaskTrace(M=M)

    def loss_of(m: torch.Tensor) -> float:
        return float(mask_loss(m, W, X, lam=lam, causal=causal, pad_mask=pad_mask, F_star=F_star))

    if solver == "gd":
        if lr is None:
            trace.lipschitz = estimate_lipschitz(M, W, X, lam=lam, causal=causal, pad_mask=pad_mask)
            lr = 1.0 / (safety * trace.lipschitz)
        trace.step_size = lr
        for t in range(steps):
            trace.losses.append(loss_of(M))
            if stop_mean_mask is not None and float(M.mean()) < stop_mean_mask:
                trace.stopped_at = t
                break
            M = M - lr * mask_grad(M, W, X, lam=lam, causal=causal, pad_mask=pad_mask, F_star=F_star)
        else:
            trace.losses.append(loss_of(M))
    elif solver == "adam":
        if lr is None:
            raise ValueError("solver='adam' needs an explicit lr, got None")
        Mp = M.clone().requires_grad_(True)
        opt = torch.optim.Adam([Mp], lr=lr)
        for t in range(steps):
            loss = mask_loss(Mp, W, X, lam=lam, causal=causal, pad_mask=pad_mask, F_star=F_star)
            trace.losses.append(float(loss.detach()))
            if stop_mean_mask is not None and float(Mp.detach().mean()) < stop_mean_mask:
                trace.stopped_at = t
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            trace.losses.append(loss_of(Mp.detach()))
        M = Mp.detach()
    else:
        raise ValueError(f"solver must be 'gd' or 'adam', got {solver!r}")
    trace.M = M
    return trace
