"""Structured QK-dimension pruning: narrow every head's query/key width, chosen on the softmax attention.

A head's scores are ``scale · q kᵀ`` with ``q, k`` of width ``hd``; only the *product* matters, so the query and
key heads can be narrowed to ``r < hd`` while the value/output path keeps its width (the head's output stays
``softmax(·) v`` with ``hd``-wide ``v``). This removes whole rows of ``W_Q``/``W_K`` (a real CPU speedup: smaller
q/k projections and ``r``-wide score products) and keeps the dense model's ``1/sqrt(hd)`` scale, so the logits
keep their size.

Choosing the narrow q/k (``reduce_qk``):

The criterion is the pruning method's registered :class:`~pipeline.pruning.registry.QKWidthRule` (``method`` names
the method; the built-in ones):

* ``method="attention"`` (``fits_attention``: the attention objective of arXiv 2410.11261): an initial rank-``r``
  pair, then Adam on the relative attention error ``Σ‖F − F*‖²/Σ‖F*‖²`` (the q/k refit of
  :mod:`pipeline.pruning.attention_objective`, with its held-out early stop). Initial pair, ``AttentionMethodConfig.qk_init`` [I: our choice, measured in
  ``benchmarks/results/pruning.md``]:

  - ``"svd"`` (default): per head, the best rank-``r`` approximation of the bilinear form
    ``[W_q b_q]ᵀ[W_k b_k]`` in the calibration inputs' metric: with ``C = Σ x̃x̃ᵀ = L Lᵀ`` (``x̃ = [x, 1]``),
    the truncated SVD of ``Lᵀ B L`` minimises ``Σ_ij (x̃_iᵀ ΔB x̃_j)²`` over all token pairs — the logits'
    least-squares error. New coordinates, so the kept dimensions are not a subset of the old ones.
  - ``"greedy"`` (the issue probe's selection): whole coordinate dimensions removed one at a time per head,
    each time the one whose removal raises the attention error least (exact softmax, calibration split).
* ``method="wanda"`` (``activation_norms``): keep the coordinate dimensions with the largest ``‖X w_q,d‖·‖X w_k,d‖``
  (activation norms of the per-dimension logit term); ``"magnitude"`` (neither): ``‖w_q,d‖·‖w_k,d‖``. No refit
  (the baselines' norm criteria).

Physical form: :class:`QKReducedSelfAttention` replaces a BERT-family self-attention module; the narrow widths
are recorded in ``config.json`` under :data:`QK_DIMS_KEY` (``{"layer": r}``) and :func:`restore_qk_dims_`
rebuilds the modules when :func:`pipeline.models.load_model` reads the model back. BERT-family encoders only:
RoPE pairs dimensions by frequency (Llama) and GPT-2 fuses q/k/v into one matrix; those raise.

Shapes: ``wq``/``wk`` (H·hd, d) in, (H·r, d) out; ``X`` (B, n, d); attention ``F`` (B, H, n, n).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.pruning.adapters import HFModule
from pipeline.pruning.geometry import AttentionGeometry
from pipeline.transforms import register_module_transform

__all__ = [
    "QK_DIMS_KEY",
    "QKReduceResult",
    "QKReducedSelfAttention",
    "qk_keep",
    "reduce_qk",
    "replace_qk_",
    "restore_qk_dims_",
]

logger = logging.getLogger(__name__)

QK_DIMS_KEY = "edgepipe_qk_dims"  # config.json: {"<layer index>": narrow q/k head width}


def qk_keep(head_dim: int, sparsity: float) -> int:
    """q/k width kept per head at ``sparsity``: the structured rounding rule (``units_to_remove``), at least 1 kept."""
    from pipeline.pruning.structured import units_to_remove

    return head_dim - units_to_remove(head_dim, sparsity)


# ------------------------------------------------------------------------------------------------------------
# the module


class QKReducedSelfAttention(nn.Module):
    """BERT-family self-attention whose query/key heads are ``qk_head_dim`` wide and value heads ``attention_head_size``.

    Same call contract as ``BertSelfAttention`` / ``BertSdpaSelfAttention`` in transformers 4.57 (returns
    ``(context (B, T, H·hd), probs or None)``; ``attention_mask`` is HF's additive float mask or None). SDPA
    with an explicit ``scale`` unless attention probabilities or a head mask are requested. Cross-attention,
    KV caches and relative position embeddings raise.
    """

    def __init__(self, base: HFModule, qk_head_dim: int) -> None:
        super().__init__()
        if getattr(base, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"QK-dimension pruning needs absolute position embeddings, got {base.position_embedding_type!r}"
            )
        if getattr(base, "is_decoder", False):
            raise ValueError("QK-dimension pruning supports encoder self-attention only (is_decoder=True)")
        self.num_attention_heads = int(base.num_attention_heads)
        self.attention_head_size = int(base.attention_head_size)  # value head width, unchanged
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.qk_head_dim = int(qk_head_dim)
        self.scale = 1.0 / math.sqrt(self.attention_head_size)  # the dense model's scale: logits keep their size
        hidden = base.query.in_features
        width = self.num_attention_heads * self.qk_head_dim
        self.query = nn.Linear(hidden, width, bias=base.query.bias is not None)
        self.key = nn.Linear(hidden, width, bias=base.key.bias is not None)
        self.value: nn.Linear = base.value
        self.dropout: nn.Dropout = base.dropout
        self.position_embedding_type = "absolute"
        self.is_decoder = False
        self.layer_idx = getattr(base, "layer_idx", None)
        self.train(base.training)  # a fresh Module starts in training mode (dropout on); keep the model's mode

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        past_key_values: Any = None,
        output_attentions: bool | None = False,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if encoder_hidden_states is not None or past_key_values is not None or kwargs.get("past_key_value") is not None:
            raise NotImplementedError("QKReducedSelfAttention has no cross-attention or KV cache")
        bsz, tgt_len, _ = hidden_states.shape
        H = self.num_attention_heads
        # (B, T, H·w) -> (B, H, T, w): heads before time for the score products
        q = self.query(hidden_states).view(bsz, tgt_len, H, self.qk_head_dim).transpose(1, 2)
        k = self.key(hidden_states).view(bsz, tgt_len, H, self.qk_head_dim).transpose(1, 2)
        v = self.value(hidden_states).view(bsz, tgt_len, H, self.attention_head_size).transpose(1, 2)
        if output_attentions or head_mask is not None:
            scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, T, T)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = self.dropout(torch.softmax(scores, dim=-1))
            if head_mask is not None:
                probs = probs * head_mask
            ctx = probs @ v  # (B, H, T, hd)
        else:
            probs = None
            ctx = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale
            )
        ctx = ctx.transpose(1, 2).reshape(bsz, tgt_len, self.all_head_size)  # (B, T, H·hd)
        return ctx, probs


def _bert_self_attentions(model: HFModule) -> list[tuple[HFModule, HFModule]]:
    """(BertAttention-like parent, its self-attention) per encoder layer, or a ValueError for other families."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(l, "attention") and hasattr(l.attention, "self") for l in layers):
        raise ValueError(
            f"QK-dimension pruning supports BERT-family encoders (query/key/value per layer), not {type(model).__name__}"
        )
    return [(l.attention, l.attention.self) for l in layers]


@torch.no_grad()
def replace_qk_(
    model: HFModule, layer: int, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor, bk: torch.Tensor | None
) -> QKReducedSelfAttention:
    """Install narrow q/k weights ``(H·r, d)`` in layer ``layer`` and record ``r`` in ``model.config``."""
    parent, sa = _bert_self_attentions(model)[layer]
    H = int(sa.num_attention_heads)
    if wq.shape[0] % H or wq.shape != wk.shape:
        raise ValueError(f"q {tuple(wq.shape)} / k {tuple(wk.shape)} are not {H} heads of equal width")
    r = wq.shape[0] // H
    new = QKReducedSelfAttention(sa, r)  # keeps sa's value projection, dropout and mode
    dtype = sa.value.weight.dtype
    new.query.weight.copy_(wq.to(dtype))
    new.key.weight.copy_(wk.to(dtype))
    if bq is not None:
        new.query.bias.copy_(bq.to(dtype))
    if bk is not None:
        new.key.bias.copy_(bk.to(dtype))
    new.to(sa.value.weight.device)
    parent.self = new
    dims = dict(getattr(model.config, QK_DIMS_KEY, None) or {})
    dims[str(layer)] = r
    setattr(model.config, QK_DIMS_KEY, dims)
    return new


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a saved model directory (single file or sharded with an index)."""
    import json

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def restore_qk_dims_(model: nn.Module, model_dir: Path) -> int:
    """Rebuild the narrow q/k modules recorded in ``config`` and load their weights from ``model_dir``.

    ``model`` was loaded with ``ignore_mismatched_sizes=True`` (its q/k of those layers are freshly initialised);
    every tensor of the safetensors files must match the rebuilt model's shapes afterwards.

    Returns:
        the number of layers rebuilt. Raises ``ValueError`` on a malformed record or a shape mismatch.
    """
    from safetensors import safe_open

    dims = getattr(model.config, QK_DIMS_KEY, None) or {}
    if not isinstance(dims, dict):
        raise ValueError(f"config {QK_DIMS_KEY!r} must map layer -> width, got {dims!r}")
    pairs = _bert_self_attentions(model)
    names = {id(m): n for n, m in model.named_modules()}
    files = _weight_files(Path(model_dir))
    for layer_s, r in dims.items():
        layer = int(layer_s) if str(layer_s).isdigit() else -1
        if not 0 <= layer < len(pairs) or not isinstance(r, int) or r < 1:
            raise ValueError(f"config {QK_DIMS_KEY!r}: bad entry {layer_s!r}: {r!r}")
        parent, sa = pairs[layer]
        new = QKReducedSelfAttention(sa, r)
        parent.self = new
        prefix = names[id(sa)]
        for attr in ("query", "key"):
            for pname, p in getattr(new, attr).named_parameters():
                key = f"{prefix}.{attr}.{pname}"
                if key not in files:
                    raise ValueError(f"missing tensor {key!r} for the narrowed q/k of layer {layer}")
                with safe_open(str(files[key]), framework="pt") as f:
                    t = f.get_tensor(key)
                if t.shape != p.shape:
                    raise ValueError(f"{key!r} has shape {tuple(t.shape)}, config {QK_DIMS_KEY} says {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(p.dtype))
    state = model.state_dict()
    for path in sorted(set(files.values())):  # ignore_mismatched_sizes must not have hidden any other mismatch
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key in state and shape != tuple(state[key].shape):
                    raise ValueError(
                        f"{path.name}: {key!r} has shape {shape}, the model expects {tuple(state[key].shape)}"
                    )
    return len(dims)


register_module_transform(
    QK_DIMS_KEY, restore_qk_dims_, description="q/k heads narrowed by prune structured_unit qk_dims"
)


# ------------------------------------------------------------------------------------------------------------
# choosing the narrow q/k


@dataclass
class QKReduceResult:
    """Narrow query/key projections of one block: ``wq``/``wk`` (H·r, d), biases (H·r,) or None; ``stats``."""

    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)


def _tokens(X: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """(N_real, d) real tokens of X (B, n, d)."""
    return X.reshape(-1, X.shape[-1]) if pad_mask is None else X[pad_mask]


def _aug(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """(out, d) weight + bias -> (out, d+1) (bias as the last column)."""
    return torch.cat([w, (torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b)[:, None]], dim=1)


def _svd_init(dense: tuple, x: torch.Tensor, H: int, hd: int, r: int, damp: float = 0.01) -> tuple:
    """Per head, the rank-``r`` q/k pair closest to the dense logits in the inputs' metric (float64).

    ``x``: (N, d) real calibration tokens. With q/k biases the inputs are augmented with a constant 1 (the bias
    is the last column of ``[W b]``). Returns (wq, bq, wk, bk) with (H·r, d) weights.
    """
    biased = dense[1] is not None and dense[3] is not None
    if not biased and (dense[1] is not None or dense[3] is not None):
        raise ValueError("QK-dimension pruning needs both or neither of the q/k biases")
    xa = x.double()
    if biased:
        xa = torch.cat([xa, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)  # (N, d+1)
    C = xa.T @ xa / max(xa.shape[0], 1)
    C += damp * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
    L = torch.linalg.cholesky(C)  # C = L Lᵀ
    Aq = _aug(dense[0], dense[1]).double() if biased else dense[0].double()  # (H·hd, d[+1])
    Ak = _aug(dense[2], dense[3]).double() if biased else dense[2].double()
    new_q, new_k = [], []
    for h in range(H):
        P = L.T @ Aq[h * hd : (h + 1) * hd].T  # (d+1, hd): Lᵀ B L = P Qᵀ
        Q = L.T @ Ak[h * hd : (h + 1) * hd].T
        Qp, Rp = torch.linalg.qr(P)
        Qq, Rq = torch.linalg.qr(Q)
        U, S, Vh = torch.linalg.svd(Rp @ Rq.T)  # (hd, hd) core of P Qᵀ
        s = S[:r].sqrt()  # split each singular value evenly between q and k
        left = Qp @ (U[:, :r] * s)  # (d+1, r): Lᵀ B L ≈ left rightᵀ
        right = Qq @ (Vh[:r].T * s)
        # B_r = L^{-T} left rightᵀ L^{-1}  ->  [W b]ᵀ = L^{-T} left
        new_q.append(torch.linalg.solve_triangular(L.T, left, upper=True).T)  # (r, d[+1])
        new_k.append(torch.linalg.solve_triangular(L.T, right, upper=True).T)
    aq, ak = torch.cat(new_q).float(), torch.cat(new_k).float()  # (H·r, d[+1])
    if not biased:
        return aq, None, ak, None
    return aq[:, :-1].contiguous(), aq[:, -1].contiguous(), ak[:, :-1].contiguous(), ak[:, -1].contiguous()


def _coordinate_select(dense: tuple, H: int, hd: int, keep_idx: torch.Tensor) -> tuple:
    """Rows of the dense q/k for kept coordinate dimensions ``keep_idx`` (H, r) -> (wq, bq, wk, bk)."""
    rows = (torch.arange(H)[:, None] * hd + keep_idx).reshape(-1)  # (H·r,)
    pick = lambda t: None if t is None else t[rows].clone()  # noqa: E731
    return pick(dense[0]), pick(dense[1]), pick(dense[2]), pick(dense[3])


def _norm_scores(dense: tuple, x: torch.Tensor | None, H: int, hd: int) -> torch.Tensor:
    """(H, hd) per-dimension size of the logit term q_d k_d: ‖w_q,d‖‖w_k,d‖, or with activations ‖X w_q,d‖‖X w_k,d‖."""
    if x is None:
        sq, sk = dense[0].norm(dim=1), dense[2].norm(dim=1)
    else:
        q = torch.nn.functional.linear(x, dense[0], dense[1])  # (N, H·hd)
        k = torch.nn.functional.linear(x, dense[2], dense[3])
        sq, sk = q.norm(dim=0), k.norm(dim=0)
    return (sq * sk).reshape(H, hd)


@torch.no_grad()
def _greedy_select(dense: tuple, train: Any, geom: AttentionGeometry, r: int) -> torch.Tensor:
    """(H, r) kept coordinate dims: per head, remove one dim at a time, the one whose removal hurts the attention least."""
    H, hd = geom.num_heads, geom.head_dim
    removed = torch.zeros(H, hd, dtype=torch.bool)
    # per chunk: q, k (b, H, n, hd) of the dense weights; targets F* cached in the objective
    qk = []
    for c in train.chunks:
        q = torch.nn.functional.linear(c.X, dense[0], dense[1]).view(*c.X.shape[:2], H, hd).transpose(1, 2)
        k = torch.nn.functional.linear(c.X, dense[2], dense[3]).view(*c.X.shape[:2], H, hd).transpose(1, 2)
        qk.append((q, k))
    for _ in range(hd - r):
        cost = torch.zeros(H, hd, dtype=torch.float64)
        for (q, k), c, t in zip(qk, train.chunks, train.targets):
            keep = (~removed).to(q.dtype)[None, :, None, :]  # (1, H, 1, hd)
            S = (q * keep) @ k.transpose(-1, -2)  # (b, H, n, n) current logits (unscaled)
            for d in range(hd):
                Sd = S - q[..., d : d + 1] @ k[..., d : d + 1].transpose(-1, -2)  # drop dim d from every head
                F = torch.softmax((Sd * geom.scale).masked_fill(~c.allowed, float("-inf")), dim=-1)
                F = F * c.row_valid[:, None, :, None]
                cost[:, d] += (F - t).pow(2).sum(dim=(0, 2, 3)).double()
        cost[removed] = float("inf")
        drop = cost.argmin(dim=1)  # (H,)
        removed[torch.arange(H), drop] = True
    return torch.stack([torch.nonzero(~removed[h]).flatten() for h in range(H)])  # (H, r), sorted


def reduce_qk(
    wq: torch.Tensor,
    bq: torch.Tensor | None,
    wk: torch.Tensor,
    bk: torch.Tensor | None,
    X: torch.Tensor | None,
    pad_mask: torch.Tensor | None,
    geom: AttentionGeometry,
    *,
    keep: int,
    method: str = "attention",
    cfg: Any = None,
    X_target: torch.Tensor | None = None,
) -> QKReduceResult:
    """Narrow one block's q/k heads from ``geom.head_dim`` to ``keep`` (see the module docstring).

    Args:
        wq, wk: (H·hd, d) dense query/key weights; bq, bk: (H·hd,) or None.
        X: (B, n, d) calibration hidden states entering attention; pad_mask: (B, n) bool or None.
        geom: the dense block's geometry (MHA without RoPE).
        keep: narrow width r, 1 <= r <= hd.
        method: a registered pruning method with a q/k-width criterion (its ``qk_width_rule``): ``"attention"``
            (init + refit on the attention objective), ``"wanda"`` or ``"magnitude"`` among the built-ins.
        cfg: :class:`pipeline.pruning.attention_objective.AttentionMethodConfig` (``qk_init``, refit options).
        X_target: (B, n, d) dense-model inputs for the target attention (error correction), or None.

    Returns:
        :class:`QKReduceResult` with (H·keep, d) weights; ``stats`` holds held-out attention errors.

    Raises:
        ValueError: an unknown method or one without a q/k-width criterion, a criterion reading calibration
            inputs without ``X``, a block that is not plain multi-head attention, or shapes that disagree.
    """
    from pipeline.pruning.attention_objective import AttentionMethodConfig, _refit, split_objectives
    from pipeline.pruning.registry import prune_method, prune_method_names

    t0 = time.perf_counter()
    cfg = cfg or AttentionMethodConfig()
    H, hd = geom.num_heads, geom.head_dim
    if geom.v_head_dim is not None:
        raise ValueError("q/k heads of this block are already narrowed; QK-dimension pruning runs once per block")
    if geom.rope is not None or geom.group_size != 1:
        raise ValueError("QK-dimension pruning supports multi-head attention without RoPE (BERT family)")
    if not 1 <= keep <= hd:
        raise ValueError(f"keep must be in [1, {hd}], got {keep}")
    if wq.shape != (H * hd, wq.shape[1]) or wk.shape != wq.shape or (X is not None and X.shape[-1] != wq.shape[1]):
        raise ValueError(
            f"wq {tuple(wq.shape)} / wk {tuple(wk.shape)} are not {H} heads of {hd} over the inputs' width"
        )
    rule = prune_method(method).qk_width_rule
    if rule is None:
        able = [n for n in prune_method_names() if prune_method(n).qk_width_rule is not None]
        raise ValueError(f"QK dims are chosen by a method with a q/k-width criterion {able}, got {method!r}")
    f32 = lambda t: None if t is None else t.detach().float()  # noqa: E731
    dense = (f32(wq), f32(bq), f32(wk), f32(bk))
    if X is None and rule.needs_inputs:
        raise ValueError(f"QK-dimension method {method!r} needs calibration inputs X")
    stats: dict[str, Any] = {"qk_method": method, "qk_keep": keep, "qk_head_dim": hd}
    train = hold = x_all = None  # magnitude without data: no objectives, nothing to report against
    if X is not None:
        Xf = X.detach().float()
        narrow = replace(geom, head_dim=keep, v_head_dim=geom.value_head_dim)  # the dense model's 1/sqrt(hd) scale
        train, hold = split_objectives(Xf, pad_mask, dense, geom, cfg, X_target, fit_geom=narrow)  # as prune_qk's
        x_all = _tokens(Xf, pad_mask)
    if rule.fits_attention and cfg.qk_init == "svd":
        assert x_all is not None  # the attention objective needs X (checked above)
        start = _svd_init(dense, x_all, H, hd, keep)
    else:
        if rule.fits_attention:
            idx = _greedy_select(dense, train, geom, keep)
        else:
            scores = _norm_scores(dense, x_all if rule.activation_norms else None, H, hd)
            idx = torch.sort(torch.topk(scores, keep, dim=1).indices, dim=1).values
        start = _coordinate_select(dense, H, hd, idx)
        stats["qk_kept_dims"] = idx.tolist()
    stats["attn_err_holdout_init"] = hold.error(start) if hold else None
    final = start
    if rule.fits_attention and cfg.refit and cfg.refit_steps > 0 and train and hold is not None:
        ones = (torch.ones_like(start[0], dtype=torch.bool), torch.ones_like(start[2], dtype=torch.bool))
        with torch.enable_grad():  # anchor: the initial pair's outputs (dense q/k have another width)
            final = _refit(start, ones, start, train, hold, train.gram(), cfg, stats)
    stats["attn_err_holdout_final"] = hold.error(final) if hold else None
    stats["seconds"] = time.perf_counter() - t0
    logger.debug(
        "reduce_qk %s: q/k width %d -> %d, held-out attention error %s -> %s in %.1fs",
        method,
        hd,
        keep,
        stats["attn_err_holdout_init"],
        stats["attn_err_holdout_final"],
        stats["seconds"],
    )
    wq_o, bq_o, wk_o, bk_o = final
    cast = lambda t, like: None if t is None or like is None else t.detach().to(like.dtype)  # noqa: E731
    return QKReduceResult(wq_o.detach().to(wq.dtype), cast(bq_o, bq), wk_o.detach().to(wk.dtype), cast(bk_o, bk), stats)
