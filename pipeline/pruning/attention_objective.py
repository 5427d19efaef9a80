"""Attention-approximation pruning of the query/key projections ("Beyond Linear Approximations", arXiv 2410.11261).

The paper chooses the pruning mask so that the *nonlinear* attention matrix ``softmax(X W Xᵀ)`` is preserved,
rather than each linear map on its own (Wanda, SparseGPT). The merged ``W = scale·W_Q W_Kᵀ`` is d×d per head,
so masking it cannot shrink a real model; here the masks live on the real ``(out, in)``
weights ``wq``/``wk`` (``M_q∘W_Q``, ``M_k∘W_K``) and the attention is formed exactly as the model forms it:
bias, per-head split, RoPE after projection, GQA key sharing, scale, causal and padding masks. The merged-W
form, with its closed-form gradient and GD at 1/L̂, is the float64 test oracle ``tests/pipeline/pruning/attention_theory.py``.

Three stages, each optional and chosen by :class:`AttentionMethodConfig`:

1. **support** - which entries survive: the paper's mask optimisation (``"attention_mask"``: GD/Adam on
   real-valued ``M_q, M_k`` with an L2 penalty, stopped early, scored by ``|M∘W|``), Wanda scores, or SparseGPT.
2. **refit** - the surviving entries (and the biases) are re-optimised on the attention objective
   ``Σ‖F − F*‖² / Σ‖F*‖²`` with Adam, starting from the support's weights (SparseGPT's reconstruction when the
   support is SparseGPT), with an anchor toward the dense layer outputs (SparseGPT's own objective) against
   over-fitting, and early stopping on a held-out split of the calibration sequences (the best held-out
   iterate is returned, step 0 included, so the refit never returns worse held-out error than its start).
3. **binarisation** is exact: pruned entries are exactly 0 at the requested sparsity/pattern.

Shapes: ``wq`` (H·hd, d), ``wk`` (Hkv·hd, d), ``X`` (B, n, d), attention ``F`` (B, H, n, n).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.pruning.geometry import AttentionGeometry
from pipeline.pruning.masks import allowed_positions, binarize_scores
from pipeline.pruning.registry import PruneMethod, QKWidthRule, matrix_methods, register_qk_method

__all__ = ["AttentionMethodConfig", "QKResult", "prune_qk", "qk_attention", "relative_frobenius_error"]

logger = logging.getLogger(__name__)


class AttentionMethodConfig(BaseModel):
    """Options of the attention-approximation q/k pruner.

    Defaults were chosen by ``benchmarks/prune_qk_probe.py`` on all-MiniLM-L6-v2 (q/k only, 64 calibration
    passages, 256 held-out passages, layers pruned independently; ``benchmarks/results/prune_qk_probe.md``).
    Held-out attention error / embedding cos mean / min / recall@10:

    * 50 %: Wanda 0.164 / 0.9895 / 0.962 / 0.845; SparseGPT 0.128 / 0.9934 / 0.975 / 0.877;
      paper mask (Adam, λ 0.1, stop at mean M < 0.5, |M∘W|) 0.181 / 0.9871 / 0.961 / 0.830;
      **default** (SparseGPT support + 25 Adam steps at 3e-3, outputs anchor 0.1, held-out early stop)
      0.105 / 0.9957 / 0.987 / 0.903; 60 steps at 1e-3: 0.098 / 0.9962 / 0.990 / 0.907 at ~2.4× the time.
    * 70 %: Wanda 0.321 / 0.950 / 0.789 / 0.686; SparseGPT 0.242 / 0.973 / 0.888 / 0.765;
      **default** 0.185 / 0.985 / 0.944 / 0.823; 60 steps at 1e-3: 0.181 / 0.986 / 0.943 / 0.823.

    The refit over-fits the 48 training passages (calibration error 0.05 vs 0.105 held-out at 50 %), which the
    held-out early stop and the output anchor bound; the step count is set by the ~5 s/layer time budget.
    The paper's pure mask method is kept as the faithful mode (``support="attention_mask"``).

    Whole-model runs with error correction (``PruneConfig.error_correction``, sequential): ``correct_qk`` first
    re-solves q/k toward the dense stream's outputs (the start SparseGPT-ec uses), so the refit improves on the
    linear correction instead of replacing it. MiniLM whole model (``benchmarks/bench_pruning.py`` protocol), attn
    err / cos mean / cos min / R@10 without → with: 50 % 0.197 / 0.913 / 0.799 / 0.677 → 0.195 / 0.913 / 0.766 /
    0.677; 70 % 0.310 / 0.754 / 0.478 / 0.474 → 0.307 / 0.753 / 0.522 / 0.471 (SparseGPT 70 %: 0.369 / 0.715 /
    0.489 / 0.420). ``qk_init`` only matters for structured q/k-width pruning (:mod:`pipeline.pruning.qk_dims`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    support: Literal["attention_mask", "wanda", "sparsegpt"] = Field(
        "sparsegpt",
        description="who chooses the kept q/k entries: the paper's mask optimisation, Wanda scores, or SparseGPT",
    )
    mask_solver: Literal["none", "gd", "adam"] = Field(
        "adam",
        description="solver for the paper's real-valued mask (support='attention_mask' only); "
        "gd = theory mode with step 1/(safety·L̂), L̂ from Hessian-vector power iteration",
    )
    mask_steps: int = Field(50, ge=1, description="max iterations of the mask solver")
    mask_lr: float = Field(0.01, gt=0, description="Adam step for the mask (GD ignores it and uses 1/(safety·L̂))")
    lambda_reg: float = Field(0.1, ge=0, description="λ of the L2 mask penalty (λ/2)·mean(M²); λ=0 keeps M=1 optimal")
    gd_safety: float = Field(2.0, ge=1, description="GD step = 1/(gd_safety·L̂); L̂ is local to M=1, hence > 1")
    mask_score: Literal["m", "mw", "mw_wanda"] = Field(
        "mw", description="binarisation score: M, |M∘W|, or |M∘W|·‖X_j‖ (raw M ranks badly per the issue probe)"
    )
    mask_stop_mean: float | None = Field(
        0.5,
        gt=0,
        lt=1,
        description="stop the mask solver once mean(M) < this (the regularised minimiser is M→0, "
        "which flattens attention; the mask only ranks well when stopped early); None = off",
    )
    granularity: Literal["row", "matrix"] = Field(
        "row", description="unstructured binarisation per output row (Wanda's granularity) or per matrix"
    )
    refit: bool = Field(True, description="re-optimise the kept q/k entries on the attention objective")
    refit_steps: int = Field(
        25, ge=0, description="max Adam steps of the refit (25 ≈ 60 in quality on MiniLM, 2.4× faster)"
    )
    refit_lr: float = Field(
        3e-3, gt=0, description="Adam learning rate of the refit (MiniLM q/k weights are O(0.05-0.1))"
    )
    refit_bias: bool = Field(True, description="also refit the (unpruned) q/k biases")
    refit_init: Literal["support", "original"] = Field(
        "support", description="refit start: the support's weights (SparseGPT's reconstruction) or original∘mask"
    )
    anchor: Literal["none", "weights", "outputs"] = Field(
        "outputs",
        description="regulariser toward the dense layer: ‖ΔW‖²/‖W‖² or ‖XΔWᵀ‖²/‖XWᵀ‖² (SparseGPT's objective)",
    )
    anchor_reg: float = Field(
        0.1, ge=0, description="weight of the anchor term relative to the relative attention error"
    )
    loss: Literal["frobenius"] = Field(
        "frobenius",
        description="attention discrepancy: Σ‖F−F*‖²_F / Σ‖F*‖²_F (the paper's Frobenius loss, made scale-free)",
    )
    early_stop: bool = Field(
        True, description="keep the iterate with the best held-out attention error (step 0 included)"
    )
    holdout_fraction: float = Field(
        0.25, ge=0, lt=1, description="fraction of calibration sequences held out for early stopping (0 = none)"
    )
    eval_every: int = Field(5, ge=1, description="held-out evaluation period in steps")
    patience: int = Field(4, ge=1, description="stop after this many evaluations without held-out improvement")
    chunk_size: int = Field(16, ge=1, description="sequences per length bucket (sorted by length to avoid padding)")
    seed: int = Field(0, description="seed of the held-out split")
    correct_qk: bool = Field(
        True,
        description="with error correction: re-solve q/k toward the dense stream's linear outputs first (as "
        "SparseGPT-ec does); the support, the refit's start and its anchor then use those weights "
        "(MiniLM whole 70 %: worst-case cos 0.478 -> 0.522, SparseGPT 0.489)",
    )
    qk_init: Literal["svd", "greedy"] = Field(
        "svd",
        description="structured QK dims: start of the refit - per-head rank-r SVD of the bilinear form in the "
        "inputs' metric, or whole coordinate dims removed greedily by the attention loss [I]",
    )
    companion: str = Field(
        "sparsegpt",
        description="pruner the driver uses for v/o/FFN alongside this method (not used here): a registered method"
        " with a per-matrix rule (pipeline.pruning.registry.matrix_methods())",
    )

    @field_validator("companion")
    @classmethod
    def _check_companion(cls, v: str) -> str:
        allowed = matrix_methods()
        if v not in allowed:
            raise ValueError(f"companion must be one of {allowed}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> AttentionMethodConfig:
        if self.support == "attention_mask" and self.mask_solver == "none":
            raise ValueError("support='attention_mask' needs mask_solver 'gd' or 'adam', got 'none'")
        return self


@dataclass
class QKResult:
    """Pruned query/key projections.

    Attributes:
        wq, bq, wk, bk: same shapes and dtypes as the inputs; pruned entries exactly 0.
        mask_q, mask_k: bool keep-masks, like ``wq``/``wk``.
        stats: attention errors (relative Frobenius ``‖F−F*‖/‖F*‖`` over calibration / held-out split, for the
            support alone and after refit), loss-curve summary, steps, seconds, achieved sparsity.
    """

    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    mask_q: torch.Tensor
    mask_k: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# attention of the real projections


@dataclass
class _Chunk:
    """One length bucket: X (b, n, d), allowed (b, 1, n, n), row_valid (b, n), positions (b, n)."""

    X: torch.Tensor
    allowed: torch.Tensor
    row_valid: torch.Tensor
    positions: torch.Tensor


def _make_chunks(
    X: torch.Tensor, pad_mask: torch.Tensor | None, geom: AttentionGeometry, seq_ids: list[int], chunk_size: int
) -> list[_Chunk]:
    """Bucket sequences by real length and trim each bucket's trailing padding (cheap n² work)."""
    B, n, _ = X.shape
    if pad_mask is None:
        pad_mask = torch.ones(B, n, dtype=torch.bool, device=X.device)
    # Positions from the mask (HF's cumsum rule): right padding gives arange, left padding stays correct.
    positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)
    idx = torch.arange(n, device=X.device)
    last = torch.where(pad_mask, idx, torch.full_like(idx, -1)).amax(-1) + 1  # (B,) trimmed length
    order = sorted(seq_ids, key=lambda i: int(last[i]))
    chunks = []
    for s in range(0, len(order), chunk_size):
        ids = torch.tensor(order[s : s + chunk_size], device=X.device)
        L = max(int(last[ids].max()), 1)
        pm = pad_mask[ids, :L]
        allowed, row_valid = allowed_positions(L, causal=geom.causal, pad_mask=pm)
        chunks.append(_Chunk(X[ids, :L], allowed[:, None], row_valid, positions[ids, :L]))
    return chunks


def _heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, n_heads, head_dim).transpose(1, 2)  # (b, n, h·hd) -> (b, h, n, hd)


def _chunk_attention(
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    c: _Chunk,
    geom: AttentionGeometry,
) -> torch.Tensor:
    """(b, H, n, n) attention with padded query rows zeroed."""
    q = _heads(torch.nn.functional.linear(c.X, wq, bq), geom.num_heads, geom.head_dim)  # (b, H, n, hd)
    k = _heads(torch.nn.functional.linear(c.X, wk, bk), geom.num_kv_heads, geom.head_dim)  # (b, Hkv, n, hd)
    if geom.rope is not None:
        q, k = geom.rope(q, c.positions), geom.rope(k, c.positions)
    if geom.group_size > 1:
        k = k.repeat_interleave(geom.group_size, dim=1)  # (b, H, n, hd): kv head j serves q heads j·g..j·g+g-1
    S = (q @ k.transpose(-1, -2)) * geom.scale  # (b, H, n, n)
    F = torch.softmax(S.masked_fill(~c.allowed, float("-inf")), dim=-1)
    return F * c.row_valid[:, None, :, None]


def qk_attention(
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    X: torch.Tensor,
    pad_mask: torch.Tensor | None,
    geom: AttentionGeometry,
) -> torch.Tensor:
    """Softmax attention of one block, formed as the model forms it.

    Args:
        wq: (H·hd, d); bq: (H·hd,) or None; wk: (Hkv·hd, d); bk: (Hkv·hd,) or None.
        X: (B, n, d) hidden states entering attention.
        pad_mask: (B, n) bool, True = real token, or None.
        geom: heads, scale, causal, RoPE, GQA.

    Returns:
        (B, H, n, n) attention probabilities; rows of padded queries are 0.
    """
    B, n, _ = X.shape
    if pad_mask is None:
        pad_mask = torch.ones(B, n, dtype=torch.bool, device=X.device)
    allowed, row_valid = allowed_positions(n, causal=geom.causal, pad_mask=pad_mask)
    c = _Chunk(X, allowed[:, None], row_valid, (pad_mask.long().cumsum(-1) - 1).clamp(min=0))
    return _chunk_attention(wq, bq, wk, bk, c, geom)


def relative_frobenius_error(F: torch.Tensor, F_star: torch.Tensor) -> float:
    """Relative Frobenius error ``‖F − F*‖_F / ‖F*‖_F`` over all sequences and heads."""
    return float((F - F_star).norm() / F_star.norm())


class _Objective:
    """Σ_chunks ‖F − F*‖² / Σ‖F*‖² on a fixed set of sequences, with F* of the dense weights cached."""

    def __init__(
        self,
        chunks: list[_Chunk],
        dense: tuple,
        geom: AttentionGeometry,
        target_chunks: list[_Chunk] | None = None,
        target_geom: AttentionGeometry | None = None,
    ) -> None:
        """``target_chunks``: the same sequences as the dense model sees them (F* from those), default ``chunks``.

        ``target_geom``: geometry of the dense weights when it differs from the optimised ones' (QK-dimension
        pruning narrows the q/k heads), default ``geom``.
        """
        self.chunks, self.geom = chunks, geom
        self.n_seqs = sum(int(c.X.shape[0]) for c in chunks)
        with torch.no_grad():
            wq, bq, wk, bk = dense  # (H·hd, d), (H·hd,) | None, (Hkv·hd, d), (Hkv·hd,) | None
            self.targets = [_chunk_attention(wq, bq, wk, bk, c, target_geom or geom) for c in (target_chunks or chunks)]
        self.denom = float(sum(t.pow(2).sum() for t in self.targets)) or 1.0

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def gram(self) -> torch.Tensor:
        """(d+1, d+1) ``[X 1]ᵀ[X 1]`` over the real tokens: the refit anchor's output metric (bias column last)."""
        x = torch.cat([c.X[c.row_valid] for c in self.chunks])  # (N, d) real tokens only
        xa = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        return xa.T @ xa

    def sq_error(self, params: tuple | Callable[[], tuple], backward_scale: float | None = None) -> float:
        """Relative squared error; if ``backward_scale`` is given, backprop each chunk (memory stays one chunk).

        ``params`` may be a callable that rebuilds (wq, bq, wk, bk) from leaves, so each chunk gets its own graph.
        """
        total = 0.0
        for c, t in zip(self.chunks, self.targets):
            p = params() if callable(params) else params
            wq, bq, wk, bk = p
            e = (_chunk_attention(wq, bq, wk, bk, c, self.geom) - t).pow(2).sum() / self.denom
            if backward_scale is not None:
                (backward_scale * e).backward()
            total += float(e.detach())
        return total

    @torch.no_grad()
    def error(self, params: tuple) -> float:
        """Relative Frobenius error ‖F−F*‖/‖F*‖."""
        return math.sqrt(self.sq_error(params))


def split_objectives(
    X: torch.Tensor,
    pad_mask: torch.Tensor | None,
    dense: tuple,
    geom: AttentionGeometry,
    cfg: AttentionMethodConfig,
    X_target: torch.Tensor | None = None,
    fit_geom: AttentionGeometry | None = None,
) -> tuple[_Objective, _Objective]:
    """Train / held-out attention objectives over a seeded split of whole calibration sequences.

    Args:
        X: (B, n, d) float32 inputs of the weights being fitted; pad_mask: (B, n) bool or None.
        dense: (wq, bq, wk, bk) whose attention is the target F* (formed on ``X_target`` when given).
        cfg: ``holdout_fraction``, ``seed`` and ``chunk_size``.
        X_target: (B, n, d) the same passages as the dense model sees them (error correction), or None.
        fit_geom: geometry of the fitted weights when it differs from ``geom`` (narrowed q/k heads).
    """
    if X_target is not None and X_target.shape != X.shape:
        raise ValueError(f"X_target shape {tuple(X_target.shape)} != X shape {tuple(X.shape)}")
    B = X.shape[0]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_hold = round(cfg.holdout_fraction * B) if B > 1 else 0
    Xt = None if X_target is None else X_target.detach().float()
    fit = fit_geom or geom

    def objective(ids: list[int]) -> _Objective:
        tgt = None if Xt is None else _make_chunks(Xt, pad_mask, geom, ids, cfg.chunk_size)
        return _Objective(_make_chunks(X, pad_mask, fit, ids, cfg.chunk_size), dense, fit, tgt, target_geom=geom)

    return objective(sorted(perm[n_hold:])), objective(sorted(perm[:n_hold]))


# ----------------------------------------------------------------------------------------------------------
# supports


def _hessian(X: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """SparseGPT's H = (2/N) Σ x xᵀ over real tokens, (d, d) in float32."""
    x = X.reshape(-1, X.shape[-1]) if pad_mask is None else X[pad_mask]
    x = x.float()
    return 2.0 / max(x.shape[0], 1) * (x.T @ x)


def _col_norms(X: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """‖X_j‖₂ over real tokens, (d,)."""
    x = X.reshape(-1, X.shape[-1]) if pad_mask is None else X[pad_mask]
    return x.float().norm(dim=0)


def _binarize(scores: torch.Tensor, sparsity: float, pattern: str, n: int, m: int, granularity: str) -> torch.Tensor:
    if pattern == "n:m":
        return binarize_scores(scores, sparsity, n=n, m=m)
    return binarize_scores(scores, sparsity, granularity=granularity)  # type: ignore[arg-type]


def _mask_support(
    w: tuple,
    train: _Objective,
    hold: _Objective,
    col_norm: torch.Tensor,
    cfg: AttentionMethodConfig,
    sparsity: float,
    pattern: str,
    n: int,
    m: int,
    stats: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's method on the real projections: real-valued M_q, M_k from 1, L2 penalty, early stop, score."""
    wq, bq, wk, bk = w
    Mq = torch.ones_like(wq, requires_grad=True)
    Mk = torch.ones_like(wk, requires_grad=True)
    numel = wq.numel() + wk.numel()

    def penalty() -> torch.Tensor:
        return 0.5 * cfg.lambda_reg * (Mq.pow(2).sum() + Mk.pow(2).sum()) / numel

    def closure_grad() -> float:
        Mq.grad = Mk.grad = None
        p = penalty()
        p.backward()
        return train.sq_error(lambda: (Mq * wq, bq, Mk * wk, bk), backward_scale=0.5) * 0.5 + float(p.detach())

    def score(M: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        if cfg.mask_score == "m":
            return M.detach()
        s = (M.detach() * W).abs()
        return s * col_norm if cfg.mask_score == "mw_wanda" else s

    if cfg.mask_solver == "gd":
        lip = _power_lipschitz(Mq, Mk, w, train, penalty)
        lr = 1.0 / (cfg.gd_safety * lip)
        stats["mask_lipschitz"] = lip
        opt: torch.optim.Optimizer = torch.optim.SGD([Mq, Mk], lr=lr)
    else:
        opt = torch.optim.Adam([Mq, Mk], lr=cfg.mask_lr)
    losses = []
    for _t in range(cfg.mask_steps):
        with torch.no_grad():
            mean_m = float((Mq.sum() + Mk.sum()) / numel)
        if cfg.mask_stop_mean is not None and mean_m < cfg.mask_stop_mean:
            break
        losses.append(closure_grad())
        opt.step()
    stats.update(
        mask_steps_run=len(losses),
        mask_loss_first=losses[0] if losses else None,
        mask_loss_last=losses[-1] if losses else None,
        mask_mean_final=float((Mq.sum() + Mk.sum()).detach() / numel),
    )
    return (
        _binarize(score(Mq, wq), sparsity, pattern, n, m, cfg.granularity),
        _binarize(score(Mk, wk), sparsity, pattern, n, m, cfg.granularity),
    )


def _power_lipschitz(
    Mq: torch.Tensor, Mk: torch.Tensor, w: tuple, train: _Objective, penalty, iters: int = 10
) -> float:
    """|λ_max| of the Hessian of the mask loss at the current (Mq, Mk), by Hessian-vector power iteration."""
    wq, bq, wk, bk = w
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(Mq.shape, generator=gen), torch.randn(Mk.shape, generator=gen)]
    nv = math.sqrt(sum(float(x.pow(2).sum()) for x in v))
    v = [x / nv for x in v]
    est = 0.0
    for _ in range(iters):
        loss = penalty() + 0.5 * sum(
            (_chunk_attention(Mq * wq, bq, Mk * wk, bk, c, train.geom) - t).pow(2).sum() / train.denom
            for c, t in zip(train.chunks, train.targets)
        )
        g = torch.autograd.grad(loss, [Mq, Mk], create_graph=True)
        hv = torch.autograd.grad(g, [Mq, Mk], grad_outputs=v)
        est = math.sqrt(sum(float(h.pow(2).sum()) for h in hv))
        if est == 0.0:
            break
        v = [h / est for h in hv]
    return max(est, 1e-12)


def _sparsegpt(w: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: str, n: int, m: int):
    from pipeline.pruning.sparsegpt import sparsegpt_prune  # sibling module, imported where used

    nn_, mm = (n, m) if pattern == "n:m" else (0, 0)
    new_w, keep = sparsegpt_prune(w.float(), H, sparsity=sparsity, n=nn_, m=mm)
    return new_w.float(), keep.bool()


# ----------------------------------------------------------------------------------------------------------
# refit


def _refit(
    start: tuple,
    masks: tuple,
    dense: tuple,
    train: _Objective,
    hold: _Objective,
    G: torch.Tensor,
    cfg: AttentionMethodConfig,
    stats: dict,
) -> tuple:
    """Adam on the kept entries (forward uses W∘mask, so pruned entries get zero gradient and stay 0)."""
    mq, mk = masks
    wq0, bq0, wk0, bk0 = dense
    wq = (start[0] * mq).clone().requires_grad_(True)
    wk = (start[2] * mk).clone().requires_grad_(True)
    bq = start[1].clone().requires_grad_(cfg.refit_bias) if start[1] is not None else None
    bk = start[3].clone().requires_grad_(cfg.refit_bias) if start[3] is not None else None
    opt = torch.optim.Adam([p for p in (wq, wk, bq, bk) if p is not None and p.requires_grad], lr=cfg.refit_lr)

    # Anchor normalisers. "outputs": ‖[X,1](ΔW,Δb)ᵀ‖² = tr(ΔWa G ΔWaᵀ) with G = [X,1]ᵀ[X,1] over train tokens.
    def aug(wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        col = b if b is not None else torch.zeros(wt.shape[0], dtype=wt.dtype)
        return torch.cat([wt, col[:, None]], dim=1)  # (out, d+1)

    Aq0, Ak0 = aug(wq0, bq0), aug(wk0, bk0)
    if cfg.anchor == "outputs":
        nq, nk = float(((Aq0 @ G) * Aq0).sum()), float(((Ak0 @ G) * Ak0).sum())
    else:
        nq, nk = float(Aq0.pow(2).sum()), float(Ak0.pow(2).sum())

    def anchor() -> torch.Tensor:
        if cfg.anchor == "none" or cfg.anchor_reg == 0:
            return torch.zeros(())
        dq, dk = aug(wq * mq, bq) - Aq0, aug(wk * mk, bk) - Ak0
        if cfg.anchor == "outputs":
            a = ((dq @ G) * dq).sum() / nq + ((dk @ G) * dk).sum() / nk
        else:
            a = dq.pow(2).sum() / nq + dk.pow(2).sum() / nk
        return cfg.anchor_reg * a

    def params() -> tuple:
        return (wq * mq, bq, wk * mk, bk)

    def snapshot() -> tuple:
        return tuple(None if p is None else p.detach().clone() for p in params())

    use_hold = cfg.early_stop and bool(hold)
    best = (hold.error(params()) if use_hold else float("nan"), 0, snapshot())
    bad, losses, t = 0, [], 0
    for t in range(1, cfg.refit_steps + 1):
        opt.zero_grad()
        a = anchor()
        if a.requires_grad:
            a.backward()
        losses.append(train.sq_error(params, backward_scale=1.0) + float(a.detach()))
        opt.step()
        if use_hold and (t % cfg.eval_every == 0 or t == cfg.refit_steps):
            e = hold.error(params())
            if e < best[0]:
                best, bad = (e, t, snapshot()), 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if not use_hold:
        best = (float("nan"), t, snapshot())
    stats.update(
        refit_steps_run=t if cfg.refit_steps else 0,
        refit_best_step=best[1],
        refit_loss_first=losses[0] if losses else None,
        refit_loss_last=losses[-1] if losses else None,
        refit_loss_min=min(losses) if losses else None,
    )
    return best[2]


# ----------------------------------------------------------------------------------------------------------
# entry point


def prune_qk(
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    X: torch.Tensor,
    pad_mask: torch.Tensor | None,
    geom: AttentionGeometry,
    *,
    sparsity: float,
    pattern: str = "unstructured",
    n: int = 2,
    m: int = 4,
    cfg: AttentionMethodConfig | None = None,
    hessian_q: torch.Tensor | None = None,
    hessian_k: torch.Tensor | None = None,
    X_target: torch.Tensor | None = None,
    start: tuple | None = None,
) -> QKResult:
    """Prune one block's query and key projections so that its softmax attention is preserved.

    Args:
        wq: (H·hd, d) query weight, torch (out, in) layout; bq: (H·hd,) or None.
        wk: (Hkv·hd, d) key weight; bk: (Hkv·hd,) or None.
        X: (B, n, d) calibration hidden states entering attention.
        pad_mask: (B, n) bool, True = real token, or None.
        geom: scale, causal, RoPE, GQA of the block.
        sparsity: fraction of wq and of wk entries set to 0, in [0, 1). For ``pattern="n:m"`` it must equal 1 − n/m.
        pattern: "unstructured" or "n:m" (in every group of m consecutive input columns, n entries are kept).
        n, m: the n:m pattern (project convention, as ``sparsegpt_prune`` and ``masks.nm_mask``).
        cfg: method options (defaults: :class:`AttentionMethodConfig`).
        hessian_q, hessian_k: optional (d, d) XᵀX accumulations for the SparseGPT support; computed from X if None.
        X_target: (B, n, d) the same passages' hidden states in the *dense* model (error correction): the target
            attention F* is formed from these with the dense weights, so the pruned q/k, fed the pruned model's
            X, aim at the dense model's attention. None = F* from X (the paper's per-layer objective).
        start: optional (wq, bq, wk, bk) the support is chosen from, the refit starts from and its anchor pulls
            toward (e.g. q/k already re-solved toward the dense stream); the target F* still uses the dense weights.

    Returns:
        :class:`QKResult`; weights in the input dtype, pruned entries exactly 0.
    """
    cfg = cfg or AttentionMethodConfig()
    t0 = time.perf_counter()
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern not in ("unstructured", "n:m"):
        raise ValueError(f"pattern must be 'unstructured' or 'n:m', got {pattern!r}")
    if pattern == "n:m" and abs(sparsity - (1 - n / m)) > 1e-9:
        raise ValueError(f"n:m pattern {n}:{m} removes {1 - n / m:.3f} of the weights, but sparsity={sparsity}")
    d = X.shape[-1]
    if wq.shape != (geom.num_heads * geom.head_dim, d) or wk.shape != (geom.num_kv_heads * geom.head_dim, d):
        raise ValueError(f"wq {tuple(wq.shape)} / wk {tuple(wk.shape)} do not match geometry {geom} and d={d}")
    if pad_mask is not None and pad_mask.shape != X.shape[:2]:
        raise ValueError(f"pad_mask shape {tuple(pad_mask.shape)} != X batch/seq shape {tuple(X.shape[:2])}")

    out_dtype = wq.dtype
    f32 = lambda t: None if t is None else t.detach().float()  # noqa: E731 - optimisation runs in fp32
    dense = (f32(wq), f32(bq), f32(wk), f32(bk))
    if start is not None and any(
        (a is None) != (b is None) or (a is not None and b is not None and a.shape != b.shape)
        for a, b in zip(start, (wq, bq, wk, bk))
    ):
        raise ValueError("start must have the shapes of (wq, bq, wk, bk)")
    base = dense if start is None else tuple(f32(t) for t in start)  # what is pruned; dense only sets the target
    wq0, wk0 = base[0], base[2]
    assert wq0 is not None and wk0 is not None  # only the biases may be None
    Xf = X.detach().float()

    # Held-out split of whole sequences (seeded); the supports see all calibration data.
    train, hold = split_objectives(Xf, pad_mask, dense, geom, cfg, X_target)
    stats: dict[str, Any] = {"support": cfg.support, "n_train_seqs": train.n_seqs, "n_holdout_seqs": hold.n_seqs}

    # 1. support
    if cfg.support == "sparsegpt":
        Hq = _hessian(Xf, pad_mask) if hessian_q is None else hessian_q.float()
        Hk = (
            Hq
            if hessian_k is None and hessian_q is None
            else (_hessian(Xf, pad_mask) if hessian_k is None else hessian_k.float())
        )
        wq_s, mq = _sparsegpt(wq0, Hq, sparsity, pattern, n, m)
        wk_s, mk = _sparsegpt(wk0, Hk, sparsity, pattern, n, m)
    else:
        if cfg.support == "wanda":
            cn = _col_norms(Xf, pad_mask)  # (d,)
            mq = _binarize(wq0.abs() * cn, sparsity, pattern, n, m, cfg.granularity)
            mk = _binarize(wk0.abs() * cn, sparsity, pattern, n, m, cfg.granularity)
        else:
            with torch.enable_grad():
                mq, mk = _mask_support(base, train, hold, _col_norms(Xf, pad_mask), cfg, sparsity, pattern, n, m, stats)
        wq_s, wk_s = wq0 * mq, wk0 * mk
    support_params = (wq_s * mq, base[1], wk_s * mk, base[3])
    stats["attn_err_calib_support"] = train.error(support_params) if train else None
    stats["attn_err_holdout_support"] = hold.error(support_params) if hold else None

    # 2. refit
    final = support_params
    if cfg.refit and cfg.refit_steps > 0 and train:
        init = support_params if cfg.refit_init == "support" else (wq0 * mq, base[1], wk0 * mk, base[3])
        with torch.enable_grad():
            final = _refit(init, (mq, mk), base, train, hold, train.gram(), cfg, stats)
    stats["attn_err_calib_final"] = train.error(final) if train else None
    stats["attn_err_holdout_final"] = hold.error(final) if hold else None

    wq_o, bq_o, wk_o, bk_o = final
    wq_o, wk_o = (wq_o * mq).to(out_dtype), (wk_o * mk).to(out_dtype)  # exact zeros outside the support
    bq_o = None if bq is None or bq_o is None else bq_o.to(bq.dtype)
    bk_o = None if bk is None or bk_o is None else bk_o.to(bk.dtype)
    stats["sparsity_q"] = 1.0 - float(mq.float().mean())  # achieved, counted from the mask
    stats["sparsity_k"] = 1.0 - float(mk.float().mean())
    stats["seconds"] = time.perf_counter() - t0
    logger.debug(
        "prune_qk %s: holdout attn err %.4f -> %.4f in %.1fs",
        cfg.support,
        stats["attn_err_holdout_support"] or float("nan"),
        stats["attn_err_holdout_final"] or float("nan"),
        stats["seconds"],
    )
    return QKResult(wq_o, bq_o, wk_o, bk_o, mq, mk, stats)


register_qk_method(
    PruneMethod(
        name="attention",
        description="q/k pruned to preserve the softmax attention matrix (arXiv 2410.11261); v/o/FFN by its companion",
        qk_rule=prune_qk,
        qk_width_rule=QKWidthRule(fits_attention=True),
        options=AttentionMethodConfig,
        reconstructs=True,
        corrects_by_default=True,
    )
)
