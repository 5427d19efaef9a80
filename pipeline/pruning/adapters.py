"""Uniform per-block view of BERT-, GPT-2- and Llama-family Hugging Face models.

Each transformer block is exposed as a :class:`BlockView` whose matrices are plain ``(out, in)`` tensors
(``y = x @ W.T``), whatever the storage: ``nn.Linear`` (BERT, Llama) or GPT-2's ``Conv1D`` which stores the
transposed ``(in, out)`` weight and fuses q/k/v into one ``c_attn`` of width ``3 * hidden``. Setters write back
into the original storage, so an algorithm never needs to know the family.

Attention input: in all supported families the tensor entering q/k/v is exactly the tensor entering the
attention block (BERT, post-LN: the layer input; GPT-2/Llama, pre-LN: the output of ``ln_1`` /
``input_layernorm``), so it is captured with a forward hook on ``BlockView.attention_input_module`` (the module
holding q) instead of re-implementing any layer norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.loaded import HFModule
from pipeline.pruning.geometry import AttentionGeometry

__all__ = [
    "ADAPTERS",
    "ROLES_BY_TARGET",
    "BlockView",
    "HFModule",
    "MatrixRef",
    "blocks",
    "family_of",
    "register_adapter",
]


@dataclass
class MatrixRef:
    """One weight matrix of a block, seen as (out, in).

    Args:
        role: ``q``, ``k``, ``v``, ``o``, ``ffn_in.<i>`` or ``ffn_out``.
        qualname: module path in the model; fused slices carry a suffix, e.g. ``h.0.attn.c_attn[q]``.
        module: the ``nn.Linear`` / ``Conv1D`` that stores the weight (its forward input is this matrix's input).
        rows: output-feature slice inside a fused module (GPT-2 ``c_attn``), else None.
        conv1d: True when the storage is transposed ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    role: str
    qualname: str
    module: HFModule  # nn.Linear, or transformers' Conv1D
    rows: slice | None = None
    conv1d: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """(out, in) view of the stored weight (a view: in-place edits reach the model)."""
        w = self.module.weight.data
        if self.conv1d:
            w = w.t()  # Conv1D stores (in, out); y = x @ W_stored, so W_stored.T is the (out, in) matrix
        return w if self.rows is None else w[self.rows]

    @weight.setter
    def weight(self, new: torch.Tensor) -> None:
        cur = self.weight
        if new.shape != cur.shape:
            raise ValueError(f"{self.qualname}: new weight shape {tuple(new.shape)} != {tuple(cur.shape)}")
        with torch.no_grad():
            cur.copy_(new.to(cur.dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        """(out,) view of the bias, or None."""
        b = getattr(self.module, "bias", None)
        if b is None:
            return None
        return b.data if self.rows is None else b.data[self.rows]

    @bias.setter
    def bias(self, new: torch.Tensor | None) -> None:
        cur = self.bias
        if cur is None or new is None:
            if cur is not new:
                raise ValueError(f"{self.qualname}: cannot set bias {type(new).__name__} on bias {type(cur).__name__}")
            return
        with torch.no_grad():
            cur.copy_(new.to(cur.dtype))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass
class BlockView:
    """One transformer block of a supported family.

    Args:
        index: layer number.
        layer: the block module (called by the sequential driver).
        attention: the attention sub-module.
        family: adapter key (``bert``, ``gpt2``, ``llama``, ...).
        q, k, v, o: attention projections as :class:`MatrixRef`.
        ffn_in: FFN input projections (Llama: ``[gate, up]``; BERT/GPT-2: ``[intermediate]``).
        ffn_out: FFN output projection.
        geometry: heads, scale, causality and RoPE of the attention.
    """

    index: int
    layer: HFModule
    attention: HFModule
    family: str
    q: MatrixRef
    k: MatrixRef
    v: MatrixRef
    o: MatrixRef
    ffn_in: list[MatrixRef]
    ffn_out: MatrixRef
    geometry: AttentionGeometry
    extra: dict = field(default_factory=dict)

    def matrices(self) -> dict[str, MatrixRef]:
        """All matrices by role, in forward order."""
        out = {"q": self.q, "k": self.k, "v": self.v, "o": self.o}
        out.update({m.role: m for m in self.ffn_in})
        out["ffn_out"] = self.ffn_out
        return out

    @property
    def attention_input_module(self) -> nn.Module:
        """Module whose forward input is the hidden state entering attention (B, n, d)."""
        return self.q.module


# Roles pruned for each ``PruneConfig.targets`` value ("ffn_in" matches every ffn_in.<i>).
ROLES_BY_TARGET: dict[str, tuple[str, ...]] = {
    "all": ("q", "k", "v", "o", "ffn_in", "ffn_out"),
    "attention": ("q", "k", "v", "o"),
    "qk": ("q", "k"),
    "ffn": ("ffn_in", "ffn_out"),
}

AdapterFn = Callable[[nn.Module, dict[int, str]], list[BlockView]]
ADAPTERS: dict[str, AdapterFn] = {}


def register_adapter(*model_types: str) -> Callable[[AdapterFn], AdapterFn]:
    """Register a block adapter under explicit ``config.model_type`` keys."""

    def deco(fn: AdapterFn) -> AdapterFn:
        for t in model_types:
            ADAPTERS[t] = fn
        return fn

    return deco


def family_of(model: nn.Module) -> str:
    """``config.model_type`` of a supported model; raises ValueError otherwise."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {sorted(ADAPTERS)}")
    return mt


def blocks(model: nn.Module) -> list[BlockView]:
    """Block views of ``model`` (a bare or task-head HF model); call again after structural edits."""
    fam = family_of(model)
    names = {id(mod): name for name, mod in model.named_modules()}
    return ADAPTERS[fam](model, names)


def _ref(role: str, module: nn.Module, names: dict[int, str], **kw) -> MatrixRef:
    q = names[id(module)]
    if kw.get("rows") is not None:
        q = f"{q}[{role}]"
    return MatrixRef(role=role, qualname=q, module=module, **kw)


@register_adapter("bert", "roberta", "xlm-roberta", "camembert")
def _bert_blocks(model: HFModule, names: dict[int, str]) -> list[BlockView]:
    out = []
    causal = bool(getattr(model.config, "is_decoder", False))
    for i, layer in enumerate(model.base_model.encoder.layer):
        att = layer.attention
        hd = att.self.attention_head_size
        qk = getattr(att.self, "qk_head_dim", hd)  # narrowed q/k heads (pipeline.pruning.qk_dims) keep the scale
        geom = AttentionGeometry(
            num_heads=att.self.num_attention_heads,
            num_kv_heads=att.self.num_attention_heads,
            head_dim=qk,
            causal=causal,
            scale=1.0 / math.sqrt(hd),  # BertSelfAttention divides scores by sqrt(attention_head_size)
            v_head_dim=None if qk == hd else hd,
        )
        out.append(
            BlockView(
                index=i,
                layer=layer,
                attention=att,
                family="bert",
                q=_ref("q", att.self.query, names),
                k=_ref("k", att.self.key, names),
                v=_ref("v", att.self.value, names),
                o=_ref("o", att.output.dense, names),
                ffn_in=[_ref("ffn_in.0", layer.intermediate.dense, names)],
                ffn_out=_ref("ffn_out", layer.output.dense, names),
                geometry=geom,
            )
        )
    return out


@register_adapter("distilbert")
def _distilbert_blocks(model: HFModule, names: dict[int, str]) -> list[BlockView]:
    out = []
    for i, layer in enumerate(model.base_model.transformer.layer):
        att = layer.attention
        hd = att.dim // att.n_heads
        geom = AttentionGeometry(att.n_heads, att.n_heads, hd, causal=False, scale=1.0 / math.sqrt(hd))
        out.append(
            BlockView(
                index=i,
                layer=layer,
                attention=att,
                family="distilbert",
                q=_ref("q", att.q_lin, names),
                k=_ref("k", att.k_lin, names),
                v=_ref("v", att.v_lin, names),
                o=_ref("o", att.out_lin, names),
                ffn_in=[_ref("ffn_in.0", layer.ffn.lin1, names)],
                ffn_out=_ref("ffn_out", layer.ffn.lin2, names),
                geometry=geom,
            )
        )
    return out


@register_adapter("gpt2")
def _gpt2_blocks(model: HFModule, names: dict[int, str]) -> list[BlockView]:
    out = []
    cfg = model.config
    for i, block in enumerate(model.base_model.h):
        attn = block.attn
        s = attn.split_size  # width of each of q, k, v inside the fused c_attn (shrinks after head pruning)
        scale = 1.0 / math.sqrt(attn.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        geom = AttentionGeometry(attn.num_heads, attn.num_heads, attn.head_dim, causal=True, scale=scale)
        out.append(
            BlockView(
                index=i,
                layer=block,
                attention=attn,
                family="gpt2",
                q=_ref("q", attn.c_attn, names, rows=slice(0, s), conv1d=True),
                k=_ref("k", attn.c_attn, names, rows=slice(s, 2 * s), conv1d=True),
                v=_ref("v", attn.c_attn, names, rows=slice(2 * s, 3 * s), conv1d=True),
                o=_ref("o", attn.c_proj, names, conv1d=True),
                ffn_in=[_ref("ffn_in.0", block.mlp.c_fc, names, conv1d=True)],
                ffn_out=_ref("ffn_out", block.mlp.c_proj, names, conv1d=True),
                geometry=geom,
            )
        )
    return out


def _llama_rope(rotary: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """RoPE using the model's own rotary embedding module (so scaling variants are respected)."""
    from transformers.models.llama.modeling_llama import rotate_half

    def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: (B, H, N, hd); positions: (B, N) -> cos/sin (B, N, hd) -> (B, 1, N, hd) broadcast over heads
        cos, sin = rotary(x, positions)
        cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        return x * cos + rotate_half(x) * sin

    return rope


@register_adapter("llama", "mistral", "qwen2")
def _llama_blocks(model: HFModule, names: dict[int, str]) -> list[BlockView]:
    out = []
    base = model.base_model
    rope = _llama_rope(base.rotary_emb)
    for i, layer in enumerate(base.layers):
        a = layer.self_attn
        hd = a.head_dim
        # head counts from the weights, so the view stays right after structured pruning
        geom = AttentionGeometry(
            num_heads=a.q_proj.out_features // hd,
            num_kv_heads=a.k_proj.out_features // hd,
            head_dim=hd,
            causal=True,
            scale=float(a.scaling),
            rope=rope,
        )
        mlp = layer.mlp
        out.append(
            BlockView(
                index=i,
                layer=layer,
                attention=a,
                family="llama",
                q=_ref("q", a.q_proj, names),
                k=_ref("k", a.k_proj, names),
                v=_ref("v", a.v_proj, names),
                o=_ref("o", a.o_proj, names),
                ffn_in=[_ref("ffn_in.0", mlp.gate_proj, names), _ref("ffn_in.1", mlp.up_proj, names)],
                ffn_out=_ref("ffn_out", mlp.down_proj, names),
                geometry=geom,
            )
        )
    return out
