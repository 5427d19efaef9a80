"""Bounded-entry attention for HF decoders (GPT-2, Llama): normalized q / k with a capped logit scale.

The almost-linear results (Alman & Song 2023, arXiv 2302.13214) need every logit |s q.k| <= beta with small beta; pretrained heads
are far outside (MiniLM: beta 3-47). Here each head's q and k are L2-normalized and the logit scale is a fixed
cap ``beta`` (an [I] choice: a fixed cap, not a learned one), so |logit| <= beta by construction on any input.
A model trained or adapted this way is in the polynomial regime at every sequence length, and its attention
can run on :func:`~pipeline.lowrank.attention.lowrank_attention` (``degree``) with the factorized backward.

Mechanism: one function registered with ``transformers.AttentionInterface`` under ``"edgepipe_bounded"`` (the
same interface :mod:`pipeline.kernels.swap` uses); per-module options live on the attention module.

Persistence: :func:`bound_attention_` records ``{"beta": cap}`` under ``config.json`` key
``edgepipe_bounded_attention``, so ``save_pretrained`` keeps it and ``pipeline.models.load_model`` rebuilds the
bounded attention (:func:`restore_bounded_`) on load; the polynomial degree is a per-run choice, not stored.
After a kernel swap (:func:`pipeline.kernels.swap_attention_` replaces the attention function),
:func:`route_bounded_` puts the normalization and the cap back around the swapped kernels.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pipeline.transforms import register_module_transform

from .attention import lowrank_attention
from .certify import key_padding_mask
from .features import degree_for

__all__ = [
    "BOUNDED_ATTN_IMPLEMENTATION",
    "BOUNDED_CONFIG_KEY",
    "BoundedKernel",
    "bound_attention_",
    "bounded_beta",
    "bounded_degree",
    "restore_bounded_",
    "route_bounded_",
    "set_bounded_degree_",
]

BOUNDED_ATTN_IMPLEMENTATION = "edgepipe_bounded"
BOUNDED_CONFIG_KEY = "edgepipe_bounded_attention"  # config.json: {"beta": cap}
_ATTR = "_edgepipe_bounded_opts"


@dataclass(frozen=True)
class _BoundedOpts:
    beta: float
    degree: int | None


def bounded_degree(beta: float, eps: float) -> int:
    """The Taylor degree that certifies kernel relative error ``eps`` for a model bounded at ``beta``."""
    return degree_for(beta, eps)


def _bounded_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """AttentionInterface function: query (B, Hq, N, D), key / value (B, Hkv, N, D) -> ((B, N, Hq, D), None)."""
    opts: _BoundedOpts = getattr(module, _ATTR)
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    q, k = nn.functional.normalize(query, dim=-1), nn.functional.normalize(key, dim=-1)  # |q.k| <= 1
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    n = q.shape[2]
    causal = bool(is_causal) and n > 1 and attention_mask is None
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if opts.degree is None:
        out = nn.functional.scaled_dot_product_attention(
            q, k, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=opts.beta
        )
    else:
        if dropout > 0:
            raise ValueError(
                f"attention dropout={dropout} is not supported by the polynomial kernel; call model.eval()"
            )
        if q.shape[2] != key.shape[2]:
            raise ValueError("the polynomial kernel needs n_q == n_k (no KV cache)")
        key_mask, causal = key_padding_mask(attention_mask, causal, key.shape[2])  # padding / causal masks only
        out = lowrank_attention(q, k, value, degree=opts.degree, scale=opts.beta, causal=causal, key_mask=key_mask)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(BOUNDED_ATTN_IMPLEMENTATION, _bounded_attention)
    AttentionMaskInterface.register(BOUNDED_ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    out = []
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if (
            mod is not None
            and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")
            and hasattr(m, "is_causal")
            and type(m).__name__.endswith("Attention")
        ):
            out.append(m)
    return out


def bound_attention_(model: nn.Module, *, beta: float, degree: int | None = None) -> int:
    """Make every attention of an HF GPT-2 / Llama-family model bounded: normalized q, k and logit scale ``beta``.

    Args:
        model: the HF model (changed in place; train it or fine-tune it afterwards to adapt).
        beta: the cap (> 0): every |logit| <= beta.
        degree: None = exact attention (torch SDPA, dropout allowed); an int = polynomial features of that degree
            with the factorized (almost-linear) backward; :func:`bounded_degree` gives the certified degree.

    Returns:
        The number of attention modules changed.

    Raises:
        ValueError: beta <= 0, degree < 0, or no supported attention module (BERT-style encoders are not handled).
    """
    if not beta > 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if degree is not None and degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"bound_attention_: no GPT-2 / Llama-style attention module in {type(model).__name__}")
    from transformers import PreTrainedModel

    _register()
    for pm in model.modules():
        if isinstance(pm, PreTrainedModel):
            pm.set_attn_implementation(BOUNDED_ATTN_IMPLEMENTATION)
    opts = _BoundedOpts(float(beta), degree)
    for m in mods:
        setattr(m, _ATTR, opts)
    for pm in model.modules():
        if isinstance(pm, PreTrainedModel):
            setattr(pm.config, BOUNDED_CONFIG_KEY, {"beta": float(beta)})  # saved in config.json, rebuilt on load
    return len(mods)


def bounded_beta(config: Any) -> float | None:
    """The logit cap recorded in a model config (``config.edgepipe_bounded_attention.beta``), or None if unbounded.

    Raises:
        ValueError: the recorded value is not ``{"beta": <positive finite number>}``.
    """
    rec = getattr(config, BOUNDED_CONFIG_KEY, None)
    if rec is None:
        return None
    beta = rec.get("beta") if isinstance(rec, dict) else None
    if (
        set(rec if isinstance(rec, dict) else ()) != {"beta"}
        or isinstance(beta, bool)
        or not isinstance(beta, (int, float))
    ):
        raise ValueError(f'{BOUNDED_CONFIG_KEY}: expected {{"beta": <positive number>}}, got {str(rec)[:80]}')
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"{BOUNDED_CONFIG_KEY}.beta: expected a positive finite number, got {beta}")
    return float(beta)


def restore_bounded_(model: nn.Module) -> float | None:
    """Rebuild the bounded attention a loaded model's config records (exact attention, degree None).

    Returns:
        The cap, or None when the config records none (the model is left as it is).

    Raises:
        ValueError: a malformed record, or a model without GPT-2 / Llama-style attention.
    """
    beta = bounded_beta(getattr(model, "config", None))
    if beta is not None:
        bound_attention_(model, beta=beta)
    return beta


def _rebuild_bounded(model: nn.Module, folder: Path) -> int:
    """Module transform (:mod:`pipeline.transforms`): the bounded attention ``config.json`` records; returns the
    number of attention modules bounded. Raises ValueError on a malformed record."""
    beta = bounded_beta(getattr(model, "config", None))
    return 0 if beta is None else bound_attention_(model, beta=beta)


register_module_transform(
    BOUNDED_CONFIG_KEY,
    _rebuild_bounded,
    description="bounded-entry attention (normalized q/k, capped logit scale)",
    reshapes=False,
)


def set_bounded_degree_(model: nn.Module, degree: int | None) -> int:
    """Switch a bounded model's attention between exact (None) and polynomial features of ``degree``.

    Raises:
        ValueError: the model has no bounded attention.
    """
    mods = [m for m in model.modules() if hasattr(m, _ATTR)]
    if not mods:
        raise ValueError("set_bounded_degree_: the model has no bounded-entry attention")
    for m in mods:
        setattr(m, _ATTR, _BoundedOpts(getattr(m, _ATTR).beta, degree))
    return len(mods)


class BoundedKernel:
    """Kernel options (the ``run`` protocol of :mod:`pipeline.kernels.swap`) that L2-normalize q and k and use the
    logit scale ``beta``, then delegate to ``inner``: the bounded attention on top of any swapped kernel."""

    def __init__(self, inner: Any, beta: float) -> None:
        self.inner, self.beta = inner, float(beta)

    def run(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None, scale: float | None
    ) -> Tensor:
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)  # |q.k| <= 1
        return self.inner.run(q, k, v, causal=causal, attn_mask=attn_mask, scale=self.beta)


def route_bounded_(model: nn.Module, beta: float, make: Callable[[int, Any], Any] | None = None) -> int:
    """After ``swap_attention_``: wrap every module's kernel options in :class:`BoundedKernel` (normalized q / k,
    scale ``beta``), with ``make(layer, inner)`` (e.g. a probe) *inside* the wrapper so it sees the bounded
    logits. Re-routing an already wrapped model replaces the inner part and keeps one wrapper.

    Returns:
        The number of attention modules re-routed.
    """
    from .certify import install_attention_probe

    def wrap(layer: int, inner: Any) -> BoundedKernel:
        inner = inner.inner if isinstance(inner, BoundedKernel) else inner
        return BoundedKernel(make(layer, inner) if make is not None else inner, beta)

    return install_attention_probe(model, wrap)
