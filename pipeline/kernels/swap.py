"""Swap the attention computation of HF transformers (4.57) models for ``pipeline.kernels.attention``.

Two mechanisms, chosen per module family (transformers 4.57.6):

* GPT-2, Llama (and every model whose attention module calls
  ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``): we register one attention function
  under the name ``"edgepipe"`` with ``transformers.AttentionInterface`` and its mask builder with
  ``AttentionMaskInterface`` (the SDPA one: a bool 4-D mask with True = attend, or None when the
  causal mask alone suffices), then call ``model.set_attn_implementation("edgepipe")``. Kernel
  options are stored per attention module (attribute ``_edgepipe_attention_opts``), so two models
  can use different kernels in one process.
* BERT-style self-attention (``query``/``key``/``value`` Linear layers; BERT in 4.57.6 still
  dispatches SDPA/eager by class, not through the interface): the instance's ``forward`` is
  replaced by one that computes Q, K, V and calls ``attention``. Masks arrive as HF additive
  float masks and are passed through unchanged.
* DistilBERT's ``MultiHeadSelfAttention`` (``q_lin``/``k_lin``/``v_lin``/``out_lin``): the same
  instance-``forward`` replacement; its (B, N) 0/1 eager mask becomes a bool key-padding mask.

Unsupported features raise instead of silently computing something else: attention dropout in
training mode, ``head_mask``, cross-attention / KV caches for BERT, relative position embeddings,
GPT-2's ``scale_attn_by_inverse_layer_idx`` / ``scale_attn_weights=False``.
"""

from __future__ import annotations

import logging
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.loaded import HFModule

from .dispatch import attention
from .registry import kernel_spec

logger = logging.getLogger(__name__)

__all__ = ["ATTN_IMPLEMENTATION", "swap_attention_"]

ATTN_IMPLEMENTATION = "edgepipe"
_OPTS_ATTR = "_edgepipe_attention_opts"


@dataclass(frozen=True)
class _Opts:
    kernel: str
    cache_words: int | None
    block_size: int | None
    block_mask_fn: Callable[[int, int], Tensor] | None

    def run(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, attn_mask: Tensor | None, scale: float | None
    ) -> Tensor:
        """q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> (B, Hq, Nq, D)."""
        block_mask = self.block_mask_fn(q.shape[2], k.shape[2]) if self.block_mask_fn is not None else None
        return attention(
            q,
            k,
            v,
            kernel=self.kernel,
            causal=causal,
            attn_mask=attn_mask,
            block_mask=block_mask,
            scale=scale,
            cache_words=self.cache_words,
            block_size=self.block_size,
        )


def _interface_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    head_mask: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` function: same contract as HF's ``sdpa_attention_forward``.

    Args:
        query: (B, Hq, Nq, D); key, value: (B, Hkv, Nk, D).
        attention_mask: bool (B, 1, Nq, >=Nk), True = attend, or None (then causality comes from
            ``is_causal`` / ``module.is_causal``, as in SDPA).

    Returns:
        ((B, Nq, Hq, D) output, None): HF reshapes it to (B, Nq, Hq * D).
    """
    opts: _Opts | None = getattr(module, _OPTS_ATTR, None)
    if opts is None:
        raise RuntimeError(f"{type(module).__name__} was not prepared by swap_attention_ (no kernel options)")
    if dropout > 0.0:
        raise ValueError(f"attention dropout={dropout} is not supported by edgepipe kernels; call model.eval()")
    if head_mask is not None:
        raise ValueError("head_mask is not supported by edgepipe kernels")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = bool(is_causal) and query.shape[2] > 1 and attention_mask is None  # SDPA's rule
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]  # static caches can be longer than K
    out = opts.run(query, key, value, causal=causal, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None  # (B, Hq, Nq, D) -> (B, Nq, Hq, D)


def _bert_self_attention_forward(
    self: HFModule,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    head_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    past_key_values=None,
    output_attentions: bool | None = False,
    cache_position: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Replacement ``forward`` of a BERT-style self-attention: (B, N, C) -> ((B, N, C), None)."""
    if encoder_hidden_states is not None or past_key_values is not None:
        raise NotImplementedError("edgepipe BERT attention swap supports self-attention without KV cache only")
    if head_mask is not None or output_attentions:
        raise NotImplementedError("edgepipe kernels do not return attention probabilities or apply head_mask")
    if self.training and self.dropout.p > 0:
        raise ValueError(f"attention dropout={self.dropout.p} is not supported by edgepipe kernels; call model.eval()")
    bsz, n, _ = hidden_states.shape
    h, d = self.num_attention_heads, self.attention_head_size
    q = self.query(hidden_states).view(bsz, n, h, d).transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D)
    k = self.key(hidden_states).view(bsz, n, h, d).transpose(1, 2)
    v = self.value(hidden_states).view(bsz, n, h, d).transpose(1, 2)
    causal = bool(self.is_decoder) and attention_mask is None and n > 1  # as BertSdpaSelfAttention
    opts: _Opts = getattr(self, _OPTS_ATTR)
    out = opts.run(q, k, v, causal=causal, attn_mask=attention_mask, scale=1.0 / math.sqrt(d))  # (B, H, N, D)
    return out.transpose(1, 2).reshape(bsz, n, h * d), None


def _distilbert_attention_forward(
    self: HFModule,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    head_mask: Tensor | None = None,
    output_attentions: bool = False,
) -> tuple[Tensor]:
    """Replacement ``forward`` of DistilBERT's ``MultiHeadSelfAttention``: (B, N, C) x3 -> ((B, N, C),).

    ``mask`` is what DistilBERT passes for its attention implementation: (B, Nk) 0/1 key padding
    (eager), an additive (B, 1, Nq, Nk) float mask or ``None`` (SDPA, all tokens real).
    """
    if head_mask is not None or output_attentions:
        raise NotImplementedError("edgepipe kernels do not return attention probabilities or apply head_mask")
    if self.training and self.dropout.p > 0:
        raise ValueError(f"attention dropout={self.dropout.p} is not supported by edgepipe kernels; call model.eval()")
    bsz, n, _ = query.shape
    h = self.n_heads
    d = self.dim // h
    q = self.q_lin(query).view(bsz, n, h, d).transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D)
    k = self.k_lin(key).view(bsz, -1, h, d).transpose(1, 2)
    v = self.v_lin(value).view(bsz, -1, h, d).transpose(1, 2)
    if mask is not None and mask.dim() == 2:
        mask = mask.bool()  # (B, Nk) key padding, True = attend
    opts: _Opts = getattr(self, _OPTS_ATTR)
    out = opts.run(q, k, v, causal=False, attn_mask=mask, scale=1.0 / math.sqrt(d))  # (B, H, N, D)
    return (self.out_lin(out.transpose(1, 2).reshape(bsz, n, h * d)),)


def _is_distilbert_style(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_lin", "k_lin", "v_lin", "out_lin")) and all(
        hasattr(m, a) for a in ("n_heads", "dim")
    )


def _is_bert_style(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")) and all(
        hasattr(m, a) for a in ("num_attention_heads", "attention_head_size", "is_decoder")
    )


def _uses_attention_interface(m: nn.Module) -> bool:
    """Attention modules whose forward dispatches through ``ALL_ATTENTION_FUNCTIONS`` (GPT-2, Llama, ...)."""
    mod = sys.modules.get(type(m).__module__)
    return (
        mod is not None
        and hasattr(mod, "ALL_ATTENTION_FUNCTIONS")
        and hasattr(m, "is_causal")
        and hasattr(m, "config")
        and type(m).__name__.endswith("Attention")
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _interface_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def swap_attention_(
    model: nn.Module,
    *,
    kernel: str,
    cache_words: int | None = None,
    block_size: int | None = None,
    block_mask_fn: Callable[[int, int], Tensor] | None = None,
) -> int:
    """Route every attention module of ``model`` through ``attention(kernel=...)``, in place.

    Args:
        model: an HF transformers model (BERT-, GPT-2- or Llama-family) or a module containing one.
        kernel: a registered kernel (``pipeline.kernels.KERNELS``).
        cache_words: fast-memory budget M per head (block sizes), see ``attention``.
        block_size: tile size / block-mask granularity, see ``attention``.
        block_mask_fn: ``(n_q, n_k) -> bool block mask`` built per call (block_sparse).

    Returns:
        The number of attention modules switched.

    Raises:
        ValueError: unknown kernel, unsupported configuration, or no attention module found.
    """
    kernel_spec(kernel)  # ValueError naming the known kernels
    opts = _Opts(kernel, cache_words, block_size, block_mask_fn)
    bert_like = [m for m in model.modules() if _is_bert_style(m)]
    distil_like = [m for m in model.modules() if _is_distilbert_style(m)]
    iface: list[HFModule] = [  # transformers attention modules on the AttentionInterface
        m
        for m in model.modules()
        if not _is_bert_style(m) and not _is_distilbert_style(m) and _uses_attention_interface(m)
    ]
    for m in bert_like:
        if getattr(m, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type={m.position_embedding_type!r} is not supported (absolute only)")
        if getattr(m, "qk_head_dim", m.attention_head_size) != m.attention_head_size:
            raise ValueError(
                f"attention heads with narrowed query/key width ({m.qk_head_dim} of {m.attention_head_size}, prune"
                " structured_unit qk_dims) are not supported by the edgepipe kernels (equal q/k/v widths)"
            )
    for m in iface:
        cfg = m.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(cfg, "scale_attn_weights", True):
            raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx=True / scale_attn_weights=False is not supported")
    if iface:
        from transformers import PreTrainedModel

        _register()
        seen: set[int] = set()
        for pm in model.modules():
            if isinstance(pm, PreTrainedModel) and id(pm.config) not in seen:
                pm.set_attn_implementation(ATTN_IMPLEMENTATION)  # also rebuilds masks as SDPA-style bool masks
                seen.update(id(s.config) for s in pm.modules() if isinstance(s, PreTrainedModel))
        for m in iface:
            if m.config._attn_implementation != ATTN_IMPLEMENTATION:
                raise ValueError(f"{type(m).__name__}: could not set attn_implementation={ATTN_IMPLEMENTATION!r}")
            setattr(m, _OPTS_ATTR, opts)
    for m in bert_like:
        setattr(m, _OPTS_ATTR, opts)
        m.forward = types.MethodType(_bert_self_attention_forward, m)
    for m in distil_like:
        setattr(m, _OPTS_ATTR, opts)
        m.forward = types.MethodType(_distilbert_attention_forward, m)
    n = len(bert_like) + len(distil_like) + len(iface)
    if n == 0:
        raise ValueError(
            f"swap_attention_: no BERT-, DistilBERT-, GPT-2- or Llama-style attention module found in {type(model).__name__}"
        )
    logger.info("swap_attention_: %d attention modules now use kernel=%r", n, kernel)
    return n
