"""A decoder (GPT-2 / Llama family) attending to a private prefix through DP releases (torch side).

Provider side: :func:`context_kv` runs the exact model over the private prefix and returns each layer's
keys/values (after RoPE, per KV head); the releases are built from those (see the stage). Device side:
:func:`apply_dp_prefix_` rewrites every attention layer so that, for a query q of the model's own tokens,

    out = (w_ctx · ctx(q) + Σ_{j ≤ t} e^{l_j − m} v_j) / (w_ctx + Σ_{j ≤ t} e^{l_j − m})
    ctx(q) = clip(φ(Pᵀq)ᵀ S̃[:, :d_v] / den_g, ±R_w),  den_g = max(φ(Pᵀq)ᵀ S̃[:, d_v], n·e^{−scale·R·‖Pᵀq‖₁})
    l_j = scale·⟨q, k_j⟩ (own tokens, causal),  m = max(max_j l_j, log den_g),  w_ctx = e^{log den_g − m}

i.e. the exact self part of the softmax numerator and denominator plus the DP estimate of the context part
(a feature map of q, two matmuls — numerator and denominator columns in one — a public guard and a
division). The model's own positions are shifted by n, as if the prefix were there. Only the noisy sums S̃
(and the public projection P) live in the model; the raw context never does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.loaded import HFModule
from pipeline.privacy.features import monomials

__all__ = [
    "ATTN_IMPLEMENTATION",
    "DPPrefix",
    "QueryRecorder",
    "apply_dp_prefix_",
    "attention_modules",
    "context_kv",
    "dp_context_part",
    "exact_prefix_logits",
    "fit_projection",
    "prefix_cache",
    "public_kv",
    "register_release_buffers",
]

ATTN_IMPLEMENTATION = "edgepipe_dp_prefix"
_ATTR = "_edgepipe_dp_prefix"


@dataclass
class DPPrefix:
    """The released state for every replaced layer, plus public metadata.

    Attributes:
        n: context rows (public under replace-one neighbours).
        degree, scale: kernel exp(scale·⟨q,k⟩) ≈ ⟨φ(q), φ(k)⟩ (scale = the layer's softmax scaling).
        key_bound, value_bound: public R, R_w.
        sums: layer -> (H_kv, r, d_v + 1) float32 noisy sums S̃.
        proj: layer -> (H_kv, d, p) public projection, or absent (p = d).
        meta: JSON-able facts (ε, δ, accounting, σ, ...), stored with the release.
    """

    n: int
    degree: int
    scale: float
    key_bound: float
    value_bound: float
    sums: dict[int, np.ndarray]
    proj: dict[int, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """safetensors: ``sums.{l}``, ``proj.{l}``; metadata (public) under ``edgepipe_dp``."""
        from safetensors.numpy import save_file

        tensors = {f"sums.{l}": np.ascontiguousarray(s, dtype=np.float32) for l, s in self.sums.items()}
        tensors.update({f"proj.{l}": np.ascontiguousarray(p, dtype=np.float32) for l, p in self.proj.items()})
        head = {
            "n": self.n,
            "degree": self.degree,
            "scale": self.scale,
            "key_bound": self.key_bound,
            "value_bound": self.value_bound,
            **self.meta,
        }
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"edgepipe_dp": json.dumps(head, sort_keys=True)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> DPPrefix:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            head = json.loads(fh.metadata()["edgepipe_dp"])
            sums = {int(k.split(".")[1]): fh.get_tensor(k) for k in fh.keys() if k.startswith("sums.")}
            proj = {int(k.split(".")[1]): fh.get_tensor(k) for k in fh.keys() if k.startswith("proj.")}
        core = {k: head.pop(k) for k in ("n", "degree", "scale", "key_bound", "value_bound")}
        return cls(sums=sums, proj=proj, meta=head, **core)

    @property
    def nbytes(self) -> int:
        return int(sum(s.size * 4 for s in self.sums.values()) + sum(p.size * 4 for p in self.proj.values()))


def attention_modules(model: nn.Module) -> list[HFModule]:
    """The decoder's self-attention modules in layer order (GPT-2 ``attn``, Llama ``self_attn``)."""
    mods: list[HFModule] = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config")
    ]
    return sorted(mods, key=lambda m: m.layer_idx)


def _base(model: nn.Module) -> nn.Module:
    for name in ("transformer", "model"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module) and hasattr(sub, "layers" if name == "model" else "h"):
            return sub
    if hasattr(model, "h") or hasattr(model, "layers"):
        return model
    raise ValueError(f"{type(model).__name__}: not a GPT-2 / Llama decoder")


@torch.no_grad()
def context_kv(model: nn.Module, ids: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the exact model over the private prefix ``ids`` (n,) and return per layer (K, V), each
    (H_kv, n, d) float64 (keys after RoPE). Provider side only."""
    out = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], use_cache=True, return_dict=True)
    return [(k[0].double().numpy(), v[0].double().numpy()) for k, v in out.past_key_values.to_legacy_cache()]


@torch.no_grad()
def public_kv(model: nn.Module, batches: list[dict[str, Tensor]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Keys/values of public text: per layer (K, V), each (H_kv, m, d) over all unmasked positions."""
    acc: list[tuple[list, list]] = []
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=True, return_dict=True)
        mask = b["attention_mask"].bool()  # (B, S)
        for i, (k, v) in enumerate(out.past_key_values.to_legacy_cache()):
            if len(acc) <= i:
                acc.append(([], []))
            acc[i][0].append(k.permute(1, 0, 2, 3)[:, mask].double().numpy())  # (H, B, S, d) -> (H, m, d)
            acc[i][1].append(v.permute(1, 0, 2, 3)[:, mask].double().numpy())
    return [(np.concatenate(k, 1), np.concatenate(v, 1)) for k, v in acc]


def fit_projection(keys: np.ndarray, dim: int) -> np.ndarray:
    """[I] per-head projection P (H, d, p): the top-p eigenvectors of the public keys' second moment KᵀK/m.
    Fitted on PUBLIC text only; logits become scale·⟨Pᵀq, Pᵀk⟩."""
    H, m, d = keys.shape
    if not 1 <= dim <= d:
        raise ValueError(f"projection dim must be in [1, {d}], got {dim}")
    out = np.empty((H, d, dim))
    for h in range(H):
        _w, U = np.linalg.eigh(keys[h].T @ keys[h] / max(m, 1))
        out[h] = U[:, ::-1][:, :dim]
    return out


class QueryRecorder:
    """Collects (layer, q (B, H_q, N, D) raw queries, DP context part (B, H_q, N, d_v)) during a forward."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, Tensor, Tensor]] = []


def _features(x: Tensor, idx: Tensor, coef: Tensor) -> Tensor:
    """φ(x): (..., p) -> (..., r): Gather into [x, 1] then a product over the degree axis."""
    ext = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (..., p + 1)
    return ext[..., idx].prod(dim=-1) * coef  # (..., r, s) -> (..., r)


def _buffer(module: nn.Module, name: str) -> Tensor:
    """A registered buffer of ``module`` (None for an optional buffer registered as None)."""
    return getattr(module, name)


def dp_context_part(module: nn.Module, q: Tensor, st: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The DP estimate of attention over the private context, from the release held by ``module``'s buffers
    ``dp_sums`` (Hq, r, d_v + 1), ``dp_proj`` (Hq, d, p) or None, ``dp_idx`` / ``dp_coef`` (the feature map).

    q (B, Hq, N, d) float32 -> (ctx (B, Hq, N, d_v) = clip(num / den_g, ±R_w), den_g (B, Hq, N)), with
    num, den = φ(Pᵀq)ᵀ S̃ and the public guard den_g = max(den, n·e^{−scale·R·‖Pᵀq‖₁}) (``st``: n, scale,
    key_bound, value_bound). Post-processing of S̃ only: no noise is drawn here.
    """
    proj, idx, coef, sums = (_buffer(module, n) for n in ("dp_proj", "dp_idx", "dp_coef", "dp_sums"))
    qp = torch.einsum("bhnd,hdp->bhnp", q, proj) if proj is not None else q  # (B, Hq, N, p)
    phi = _features(qp, idx, coef)  # (B, Hq, N, r)
    nd = torch.matmul(phi, sums)  # (B, Hq, N, r) @ (Hq, r, d_v+1) -> (B, Hq, N, d_v+1)
    floor = st["n"] * torch.exp(-st["scale"] * st["key_bound"] * qp.abs().sum(-1))  # public guard (B, Hq, N)
    den_g = torch.maximum(nd[..., -1], floor)
    ctx = torch.clamp(nd[..., :-1] / den_g[..., None], -st["value_bound"], st["value_bound"])
    return ctx, den_g


def register_release_buffers(
    m: nn.Module, prefix: DPPrefix, layer: int, num_heads: int, *, persistent: bool = False
) -> None:
    """Put layer ``layer``'s release on module ``m``: ``dp_sums`` (Hq, r, d_v+1) (KV heads repeated to the
    ``num_heads`` query heads), ``dp_proj`` (Hq, d, p) or None, ``dp_idx`` / ``dp_coef`` (the feature map).

    Raises:
        ValueError: the release's feature count does not match its degree and dimension.
    """
    sums = torch.from_numpy(np.asarray(prefix.sums[layer], dtype=np.float32))  # (Hkv, r, d_v+1)
    G = num_heads // sums.shape[0]
    proj = prefix.proj.get(layer)
    p = proj.shape[-1] if proj is not None else sums.shape[-1] - 1  # unprojected: key dim = value dim d_v
    idx, coef = monomials(p, prefix.degree, prefix.scale)
    if idx.shape[0] != sums.shape[1]:
        raise ValueError(
            f"layer {layer}: release has {sums.shape[1]} features, degree {prefix.degree} in {p} dims gives {idx.shape[0]}"
        )
    m.register_buffer("dp_sums", sums.repeat_interleave(G, dim=0), persistent=persistent)
    m.register_buffer(
        "dp_proj",
        torch.from_numpy(np.asarray(proj, np.float32)).repeat_interleave(G, dim=0) if proj is not None else None,
        persistent=persistent,
    )
    m.register_buffer("dp_idx", torch.from_numpy(idx), persistent=persistent)
    m.register_buffer("dp_coef", torch.from_numpy(coef.astype(np.float32)), persistent=persistent)


def _dp_attention(
    module: HFModule,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    head_mask=None,
    **kwargs,
) -> tuple[Tensor, None]:
    """AttentionInterface function: query (B, Hq, Nq, D), key/value (B, Hkv, Nk, D) of the model's own tokens.
    Returns ((B, Nq, Hq, D), None)."""
    st = getattr(module, _ATTR)
    if dropout > 0.0 or head_mask is not None:
        raise ValueError("DP prefix attention supports eval mode without head_mask only")
    _B, Hq, Nq, D = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    q = query.float()
    ctx, den_g = dp_context_part(module, q, st)  # (B, Hq, Nq, D), (B, Hq, Nq)
    rec = st.get("recorder")
    if rec is not None:
        rec.rows.append((module.layer_idx, q.detach(), ctx.detach()))
    k = key.repeat_interleave(G, dim=1) if G > 1 else key  # (B, Hq, Nk, D)
    v = value.repeat_interleave(G, dim=1) if G > 1 else value
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if attention_mask is not None:
        am = attention_mask[:, :, :, :Nk]
        allowed = am if am.dtype == torch.bool else am > torch.finfo(am.dtype).min / 2
    else:  # causal over own tokens: query i sits at absolute own position Nk − Nq + i
        i = torch.arange(Nq, device=q.device)[:, None] + (Nk - Nq)
        allowed = (torch.arange(Nk, device=q.device)[None, :] <= i)[None, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    log_den = torch.log(den_g)
    m = torch.maximum(logits.amax(-1), log_den)  # (B, Hq, Nq): finite even for fully masked rows
    w = torch.exp(logits - m[..., None])  # masked -> 0
    w_ctx = torch.exp(log_den - m)
    out = (w_ctx[..., None] * ctx + torch.matmul(w, v)) / (w_ctx + w.sum(-1))[..., None]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _dp_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _offset_positions(n: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        pos = kwargs.get("position_ids")
        if pos is None:
            ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else (args[0] if args else None)
            assert ids is not None  # the model is called with token ids
            past = kwargs.get("past_key_values")
            p = past.get_seq_length() if past is not None else 0
            pos = torch.arange(p, p + ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        kwargs["position_ids"] = pos + n
        return args, kwargs

    return hook


def apply_dp_prefix_(model: nn.Module, prefix: DPPrefix, *, recorder: QueryRecorder | None = None) -> int:
    """Rewrite every attention layer of ``model`` (in place) to attend to the private prefix through
    ``prefix``'s releases. Returns the number of layers rewritten.

    Raises:
        ValueError: a layer has no release, shapes disagree, or the model is not a GPT-2/Llama decoder.
    """
    from transformers import PreTrainedModel

    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__}: no decoder attention modules found")
    missing = [m.layer_idx for m in mods if m.layer_idx not in prefix.sums]
    if missing:
        raise ValueError(
            f"the release has no sums for layers {missing}; every layer that reads the context must be replaced"
        )
    cfg = mods[0].config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(cfg, "scale_attn_weights", True):
        raise ValueError("GPT-2 scale_attn_by_inverse_layer_idx=True / scale_attn_weights=False is not supported")
    _register()
    for pm in model.modules():
        if isinstance(pm, PreTrainedModel):
            pm.set_attn_implementation(ATTN_IMPLEMENTATION)
    for m in mods:
        l = m.layer_idx
        nh = int(getattr(m, "num_heads", 0) or getattr(cfg, "num_attention_heads", 0) or cfg.n_head)
        register_release_buffers(m, prefix, l, nh)
        setattr(
            m,
            _ATTR,
            {
                "n": float(prefix.n),
                "scale": float(prefix.scale),
                "key_bound": float(prefix.key_bound),
                "value_bound": float(prefix.value_bound),
                "recorder": recorder,
            },
        )
    _base(model).register_forward_pre_hook(_offset_positions(prefix.n), with_kwargs=True)
    return len(mods)


@torch.no_grad()
def exact_prefix_logits(
    model: nn.Module, ctx_ids: Tensor | None, batch: dict[str, Tensor], cache: list | None = None
) -> Tensor:
    """Logits (B, S, V) of the unmodified model for ``batch`` with the exact private prefix in front (the
    fidelity reference; provider side): ``ctx_ids`` (n,) tokens, or ``cache``, the prefix's per-layer
    (1, H_kv, n, d) keys/values (from :func:`prefix_cache`, or precomputed), so it is encoded once: O(n·S)."""
    from transformers import DynamicCache

    B = batch["input_ids"].shape[0]
    if cache is None:
        if ctx_ids is None:
            raise ValueError("dp-free reference needs ctx_ids or cache")
        cache = prefix_cache(model, ctx_ids)
    n = cache[0][0].shape[2]
    layers = tuple((k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in cache)
    past = DynamicCache.from_legacy_cache(layers)  # type: ignore[arg-type]  # annotated as a 1-tuple; one pair per layer
    mask = torch.cat([torch.ones(B, n, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], dim=1)
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0) + n
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=pos,
        past_key_values=past,
        use_cache=True,
        return_dict=True,
    )
    return out.logits


@torch.no_grad()
def prefix_cache(model: nn.Module, ctx_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The exact KV cache of the private prefix: per layer (1, H_kv, n, d) key and value tensors."""
    out = model(
        input_ids=ctx_ids[None], attention_mask=torch.ones_like(ctx_ids)[None], use_cache=True, return_dict=True
    )
    return list(out.past_key_values.to_legacy_cache())
