"""Fidelity metrics of a pruned model against its dense original.

* :func:`sparsity_report`: counted zeros per matrix and overall.
* :func:`attention_error`: per layer ``||A - Â||_F / ||A||_F`` of the softmax attention matrices over all heads,
  padding rows and columns masked out, and the mean row ``KL(A_i || Â_i)`` over real query rows. Needs the
  eager attention path (``output_attentions=True``), which this module switches on temporarily.
* :func:`layer_output_error`: per layer ``||h - ĥ||_F / ||h||_F`` of the block outputs over real tokens, captured
  with forward hooks on each block (so the final norm of decoder-only models is not mixed in).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.pruning.adapters import HFModule, blocks
from pipeline.pruning.masks import count_zeros

__all__ = ["attention_error", "eager_attention", "layer_output_error", "sparsity_report"]

logger = logging.getLogger(__name__)

_KL_EPS = 1e-12  # floor for Â inside log(A/Â): a pruned model may underflow a probability to exactly 0


def sparsity_report(model: nn.Module, names: Iterable[str] | Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of exact zeros per matrix plus ``"overall"`` (zeros / elements over all listed matrices).

    Args:
        model: the model.
        names: parameter names or ``name -> (out, in) tensor`` (see :func:`pipeline.pruning.masks.count_zeros`).
    """
    counts = count_zeros(model, names)
    rep = {n: z / t if t else 0.0 for n, (z, t) in counts.items()}
    zs = sum(z for z, _ in counts.values())
    ts = sum(t for _, t in counts.values())
    rep["overall"] = zs / ts if ts else 0.0
    return rep


@contextlib.contextmanager
def eager_attention(model: HFModule) -> Iterator[HFModule]:
    """Temporarily switch ``model`` to the eager attention implementation (needed for attention probabilities)."""
    old = getattr(model.config, "_attn_implementation", None)
    # BERT-style models pick their attention class at init and fall back to eager for output_attentions=True;
    # only models on the AttentionInterface can (and need to) be switched.
    switch = old not in (None, "eager") and getattr(model, "_supports_attention_backend", False)
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(old)


def _kwargs(model: nn.Module, batch: Mapping[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    accepted = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {k: v for k, v in batch.items() if k in accepted}
    if "use_cache" in accepted:
        kw["use_cache"] = False
    # Llama-style forwards take output_attentions through **kwargs (TransformersKwargs), not a named parameter
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kw.update({k: v for k, v in extra.items() if k in accepted or var_kw})
    return kw


def _pad(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    am = batch.get("attention_mask")
    return am.bool() if am is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)


@torch.no_grad()
def attention_error(
    dense_model: nn.Module, pruned_model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """Relative Frobenius error and row KL of the attention matrices, per layer.

    Args:
        dense_model: the reference model.
        pruned_model: the pruned model (same architecture; a layer whose head count changed reports None).
        batches: tokenized evaluation batches with ``input_ids`` (B, n) and optionally ``attention_mask`` (B, n).

    Returns:
        ``{"per_layer": [rel_err | None], "row_kl": [kl | None], "mean": x, "row_kl_mean": x}``.
    """
    num: list[float] | None = None
    den: list[float] = []
    kl_sum: list[float] = []
    rows: list[int] = []
    same_shape: list[bool] = []
    with eager_attention(dense_model), eager_attention(pruned_model):
        for batch in batches:
            A_all = dense_model(**_kwargs(dense_model, batch, output_attentions=True)).attentions
            B_all = pruned_model(**_kwargs(pruned_model, batch, output_attentions=True)).attentions
            if num is None:
                L = len(A_all)
                num, den, kl_sum, rows = [0.0] * L, [0.0] * L, [0.0] * L, [0] * L
                same_shape = [a.shape == b.shape for a, b in zip(A_all, B_all)]
            pad = _pad(batch)
            m2 = (pad[:, None, :, None] & pad[:, None, None, :]).double()  # (B, 1, n, n) real query x real key
            for i, (A, Ah) in enumerate(zip(A_all, B_all)):
                if not same_shape[i] or A.shape != Ah.shape:
                    same_shape[i] = False
                    continue
                A, Ah = A.double(), Ah.double()  # (B, H, n, n)
                num[i] += float((((A - Ah) ** 2) * m2).sum())
                den[i] += float(((A**2) * m2).sum())
                # row KL over real keys; padded query rows are dropped by the (B, 1, n) row mask
                kl = (m2 * A * (torch.log(A.clamp_min(_KL_EPS)) - torch.log(Ah.clamp_min(_KL_EPS)))).sum(-1)
                row_mask = pad[:, None, :].expand(-1, A.shape[1], -1)
                kl_sum[i] += float(kl[row_mask].sum())
                rows[i] += int(row_mask.sum())
    if num is None:
        raise ValueError("attention_error needs at least one batch")
    per_layer = [(num[i] / den[i]) ** 0.5 if same_shape[i] and den[i] > 0 else None for i in range(len(num))]
    row_kl = [kl_sum[i] / rows[i] if same_shape[i] and rows[i] else None for i in range(len(num))]
    valid = [x for x in per_layer if x is not None]
    valid_kl = [x for x in row_kl if x is not None]
    return {
        "per_layer": per_layer,
        "row_kl": row_kl,
        "mean": sum(valid) / len(valid) if valid else None,
        "row_kl_mean": sum(valid_kl) / len(valid_kl) if valid_kl else None,
    }


@torch.no_grad()
def layer_output_error(
    dense_model: nn.Module, pruned_model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]
) -> list[float]:
    """Per-block relative error ``||h - ĥ||_F / ||h||_F`` of the block outputs over real tokens."""

    def outputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        got: list[torch.Tensor] = []
        handles = []
        for b in blocks(model):

            def hook(_m: nn.Module, _a: tuple, out: Any) -> None:
                got.append((out[0] if isinstance(out, (tuple, list)) else out).detach())

            handles.append(b.layer.register_forward_hook(hook))
        try:
            model(**_kwargs(model, batch))
        finally:
            for h in handles:
                h.remove()
        return got

    num: list[float] = []
    den: list[float] = []
    for batch in batches:
        pad = _pad(batch)
        hs, hp = outputs(dense_model, batch), outputs(pruned_model, batch)
        if not num:
            num, den = [0.0] * len(hs), [0.0] * len(hs)
        for i, (h, g) in enumerate(zip(hs, hp)):
            h, g = h.double()[pad], g.double()[pad]  # (tokens, d): real tokens only
            num[i] += float(((h - g) ** 2).sum())
            den[i] += float((h**2).sum())
    return [(n / d) ** 0.5 if d > 0 else 0.0 for n, d in zip(num, den)]
