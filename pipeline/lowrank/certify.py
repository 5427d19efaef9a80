"""Gradient certification helpers for HF models: per-layer gradient comparison, per-head beta probes, and the
almost-linear attention installed head by head where it applies.

Both probes plug into the attention routing of :func:`pipeline.kernels.swap_attention_`: after a swap, every
attention module holds a kernel-options object whose ``run(q, k, v, *, causal, attn_mask, scale)`` computes
attention (q (B, Hq, N, D), k / v (B, Hkv, N, D), after RoPE where the model has it). We replace that object by
one that measures (``BetaProbe``) or computes the polynomial-feature attention for chosen heads
(``LowRankHeads``) and delegates the rest to the original one.

Sources: Alman & Song 2023, arXiv 2302.13214 (beta, degree, feature count), arXiv 2408.13233 (the almost-linear gradient).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .attention import lowrank_attention
from .features import degree_for, feature_count

__all__ = [
    "BetaProbe",
    "HeadPlan",
    "LowRankHeads",
    "compare_layer_gradients",
    "gradients_by_layer",
    "head_applicability",
    "install_attention_probe",
    "key_padding_mask",
    "layer_index",
    "projection_loss",
]

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """The transformer block a parameter belongs to (``encoder.layer.3.*``, ``model.layers.3.*``, ``h.3.*``), else None."""
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def _first_output(out: Any) -> Tensor:
    t = getattr(out, "last_hidden_state", None)
    return t if t is not None else out.logits


def projection_loss(model: nn.Module, batch: Mapping[str, Tensor], *, seed: int) -> Tensor:
    """A fixed scalar loss of any model: sum over real tokens of <first output_t, R> with R ~ N(0, 1/width) seeded.

    Task-agnostic (encoders, LM heads) and linear in the output, so its gradient is the model's vector-Jacobian
    product with a fixed random direction (an [I] choice: any smooth loss certifies the same backward pass).
    """
    out = _first_output(model(**batch))  # (B, N, W)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape[-1], generator=gen, dtype=torch.float64).to(out.dtype) / math.sqrt(out.shape[-1])
    mask = batch["attention_mask"].to(out.dtype)
    return ((out @ r) * mask).sum()


def gradients_by_layer(model: nn.Module) -> dict[int | None, Tensor]:
    """Flattened parameter gradients grouped by :func:`layer_index` (None: embeddings, heads, final norms)."""
    groups: dict[int | None, list[Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            groups.setdefault(layer_index(name), []).append(p.grad.detach().flatten())
    return {k: torch.cat(v) for k, v in groups.items()}


def compare_layer_gradients(
    candidate: nn.Module, reference: nn.Module, batches: Sequence[Mapping[str, Tensor]], *, seed: int
) -> dict[str, Any]:
    """Accumulated gradients of :func:`projection_loss` over ``batches``, candidate vs reference, per layer.

    Returns:
        ``{max_rel_err, per_layer: [{layer, rel_err, max_abs_err, params}]}`` (layers in order; ``rel_err`` =
        ||g_cand - g_ref||_2 / ||g_ref||_2 over the layer's parameters). The models' own dtype is used (the stage
        passes float64).
    """
    for m in (candidate, reference):
        m.zero_grad(set_to_none=True)
        for batch in batches:
            projection_loss(m, batch, seed=seed).backward()
    gc, gr = gradients_by_layer(candidate), gradients_by_layer(reference)
    rows = []
    for layer in sorted(k for k in gr if k is not None):
        a, b = gc.get(layer), gr[layer]
        if a is None or a.shape != b.shape:
            raise ValueError(f"layer {layer}: candidate and reference have different parameters")
        diff = (a - b).norm().item()
        norm = b.norm().item()
        rows.append(
            {
                "layer": layer,
                "rel_err": diff / norm if norm > 0 else diff,
                "max_abs_err": (a - b).abs().max().item(),
                "params": int(b.numel()),
            }
        )
    return {"max_rel_err": max((r["rel_err"] for r in rows), default=0.0), "per_layer": rows}


def _opts_attr() -> str:
    # the per-module kernel-options attribute of pipeline.kernels.swap (its documented routing mechanism)
    from pipeline.kernels import swap

    return swap._OPTS_ATTR


def install_attention_probe(model: nn.Module, make: Callable[[int, Any], Any]) -> int:
    """Route the attention of a swapped model (``swap_attention_`` already applied) through ``make(layer, inner)``.

    Args:
        model: a model whose attention modules carry kernel options (after ``swap_attention_``).
        make: called once per attention module, in module order (= layer order), with the layer index and the
            module's current options object; returns the new object (anything with ``run``).

    Returns:
        The number of attention modules re-routed.
    """
    attr = _opts_attr()
    mods = [m for m in model.modules() if hasattr(m, attr)]
    for i, m in enumerate(mods):
        setattr(m, attr, make(i, getattr(m, attr)))
    return len(mods)


def _valid_pairs(q: Tensor, k: Tensor, causal: bool, attn_mask: Tensor | None) -> Tensor:
    """bool (B, 1, Nq, Nk): which (query, key) logits the model uses (padding queries excluded where known)."""
    b, _, nq, _ = q.shape
    nk = k.shape[2]
    valid = torch.ones(b, 1, nq, nk, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
        m = m[..., :nk]
        valid = valid & m
        if nq == nk:  # self-attention: token i is padding as a query iff no query attends to it as a key
            valid = valid & valid.any(dim=-2, keepdim=True).transpose(-1, -2)
    if causal:
        valid = valid & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    return valid


class BetaProbe:
    """Kernel options that record |s q_i . k_j| of every used (query, key) pair per head, then delegate.

    ``values[h]``: list of float32 tensors of the absolute logits seen by head h.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.values: dict[int, list[Tensor]] = {}
        self.head_dim: int | None = None

    def run(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None, scale: float | None
    ) -> Tensor:
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        self.head_dim = q.shape[-1]
        ke = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, Hq, Nk, D)
        with torch.no_grad():
            logits = (s * q @ ke.transpose(-1, -2)).abs()  # (B, Hq, Nq, Nk): analysis only, calibration length
            valid = _valid_pairs(q, k, causal, attn_mask).expand_as(logits)
            for h in range(q.shape[1]):
                self.values.setdefault(h, []).append(logits[:, h][valid[:, h]].float().cpu())
        return self.inner.run(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)

    def stats(self) -> list[tuple[float, float]]:
        """[(beta = max, beta_p99)] per head."""
        out = []
        for h in sorted(self.values):
            x = torch.cat(self.values[h])
            if x.numel() == 0:
                out.append((0.0, 0.0))
                continue
            p99 = torch.kthvalue(x, max(1, math.ceil(0.99 * x.numel()))).values.item()
            out.append((float(x.max()), float(p99)))
        return out


@dataclass(frozen=True)
class HeadPlan:
    """Whether the almost-linear method applies to one head: degree g and features k = C(D + g, g)."""

    degree: int
    features: int
    applicable: bool


def head_applicability(beta: float, head_dim: int, *, eps: float, max_features: int) -> HeadPlan:
    """Degree for kernel relative error ``eps`` at ``beta`` (:func:`degree_for`), its feature count, and whether
    ``features <= max_features`` (the cost O(N k D^2) of the factorized gradient stays below exact O(N^2 D) when
    k D <= N; the stage sets ``max_features`` from its ``seq_len`` unless configured)."""
    g = degree_for(beta, eps)
    k = feature_count(head_dim, g)
    return HeadPlan(degree=g, features=k, applicable=k <= max_features)


def key_padding_mask(attn_mask: Tensor | None, causal: bool, n: int) -> tuple[Tensor | None, bool]:
    """Turn a model's attention mask into (key mask (B, N) or None, causal) for :func:`lowrank_attention`.

    Accepts None, key-padding masks (B, 1, 1, N) (bool or additive float) and bool (B, 1, N, N) masks that are
    all-rows-equal (padding) or lower-triangular-and-padding (causal).

    Raises:
        ValueError: any other mask (it has no factorized form here).
    """
    if attn_mask is None:
        return None, causal
    m = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    m = m[..., :n]
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"attention mask of shape {tuple(attn_mask.shape)} has no factorized form")
    if m.shape[2] == 1:
        return m[:, 0, 0], causal
    key = m[:, 0, -1]  # (B, N): the last query sees every real key in both cases
    if bool((m == key[:, None, None, :]).all()):
        return key, causal
    tril = torch.ones(n, n, dtype=torch.bool, device=m.device).tril()
    if bool((m == (tril & key[:, None, None, :])).all()):
        return key, True
    raise ValueError("attention mask is neither key padding nor causal-with-padding; it has no factorized form")


class LowRankHeads:
    """Kernel options computing polynomial-feature attention (factorized backward) for the heads with a degree
    and delegating the others (degree None) to the original kernel.

    Args:
        inner: the module's original options; degrees: per query head, Taylor degree or None.
    """

    def __init__(self, inner: Any, degrees: Sequence[int | None]) -> None:
        self.inner, self.degrees = inner, list(degrees)

    def run(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None, scale: float | None
    ) -> Tensor:
        hq = q.shape[1]
        if len(self.degrees) != hq:
            raise ValueError(f"{len(self.degrees)} head degrees for {hq} heads")
        rep = hq // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, Hq, N, D)
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        key_mask, fast_causal = key_padding_mask(attn_mask, causal, k.shape[2])
        out: list[Tensor | None] = [None] * hq
        groups: dict[int | None, list[int]] = {}
        for h, g in enumerate(self.degrees):
            groups.setdefault(g, []).append(h)
        for g, heads in groups.items():
            idx = torch.tensor(heads, device=q.device)
            qs, ks, vs = q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx)
            if g is None:
                y = self.inner.run(qs, ks, vs, causal=causal, attn_mask=attn_mask, scale=scale)
            else:
                y = lowrank_attention(qs, ks, vs, degree=g, scale=s, causal=fast_causal, key_mask=key_mask)
            for j, h in enumerate(heads):
                out[h] = y[:, j]
        return torch.stack(out, dim=1)  # type: ignore[arg-type]
