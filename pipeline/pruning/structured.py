"""Structured pruning: physically remove attention heads and FFN neurons.

The same number of units is removed in every layer so the config stays uniform and the model round-trips
through ``save_pretrained`` / ``from_pretrained``:

* BERT / DistilBERT / GPT-2: heads go through the model's own ``prune_heads`` (recorded in ``config.pruned_heads``, which
  ``from_pretrained`` replays); the per-head width and hence the 1/sqrt(head_dim) scale are unchanged.
* Llama family: whole KV groups are removed together with their query heads, so GQA stays valid;
  ``config.num_attention_heads`` / ``num_key_value_heads`` shrink and ``config.head_dim`` is pinned to the
  original width (otherwise ``hidden_size // num_attention_heads`` would change the scale).
* FFN neurons: rows of the FFN input matrices and columns of the FFN output matrix; ``intermediate_size``
  (``n_inner`` for GPT-2) is updated.

Ranking: ``magnitude`` = L2 norm of all weights of the unit; ``wanda`` = L2 norm of the unit's Wanda scores
(``|W_ij| * ||X_j||``, with each matrix's own input norms), i.e. an activation-weighted norm; ``sparsegpt`` =
group Optimal Brain Surgeon on the output matrix (:func:`obs_select_and_compensate`): units are removed greedily
by the output error they leave after the remaining columns (and the bias) are re-fitted by least squares.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import prune_conv1d_layer, prune_linear_layer

from pipeline.pruning.adapters import BlockView, HFModule, MatrixRef

__all__ = [
    "augmented_hessian",
    "ffn_scores",
    "head_scores",
    "obs_remove_groups",
    "obs_select_and_compensate",
    "remove_ffn_neurons_",
    "remove_heads_",
    "units_to_remove",
]

logger = logging.getLogger(__name__)


def _prune_linear(layer: nn.Linear, index: torch.Tensor, dim: int = 0) -> nn.Linear:
    """transformers' ``prune_linear_layer``: keep the int64 ``index`` entries of ``layer`` along ``dim``."""
    return prune_linear_layer(layer, index, dim=dim)  # type: ignore[arg-type]  # annotated LongTensor; any int64 Tensor


def _prune_conv1d(layer: Any, index: torch.Tensor, dim: int = 1) -> Any:
    """transformers' ``prune_conv1d_layer`` on a GPT-2 ``Conv1D`` (stored (in, out))."""
    return prune_conv1d_layer(layer, index, dim=dim)  # type: ignore[arg-type]  # annotated LongTensor; any int64 Tensor


def units_to_remove(total: int, sparsity: float) -> int:
    """Units removed from ``total`` at ``sparsity``: ``round(sparsity * total)``, at least 1 kept."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return min(total - 1, math.floor(sparsity * total + 0.5))


def _weighted(ref: MatrixRef, sq_norms: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """(out, in) float64 |W| (magnitude) or |W| * ||X_j|| (wanda) for one matrix."""
    w = ref.weight.double().abs()
    if sq_norms is None:
        return w
    return w * sq_norms[ref.role].double().clamp_min(0).sqrt().reshape(1, -1)


def head_scores(block: BlockView, sq_norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Importance of each removable attention unit: (num_kv_heads,) for GQA/MHA (a KV head with its query group).

    Args:
        block: block view.
        sq_norms: role -> (in,) squared input norms for wanda ranking, or None for magnitude.
    """
    g = block.geometry
    hd, vd, G = g.head_dim, g.value_head_dim, g.group_size  # q/k and v/o widths differ after QK-dim pruning
    q = _weighted(block.q, sq_norms).pow(2).sum(1).reshape(g.num_kv_heads, G * hd).sum(1)  # q rows of each group
    k = _weighted(block.k, sq_norms).pow(2).sum(1).reshape(g.num_kv_heads, hd).sum(1)
    v = _weighted(block.v, sq_norms).pow(2).sum(1).reshape(g.num_kv_heads, vd).sum(1)
    o = _weighted(block.o, sq_norms).pow(2).sum(0).reshape(g.num_kv_heads, G * vd).sum(1)  # o columns of the group
    return (q + k + v + o).sqrt()


def ffn_scores(block: BlockView, sq_norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Importance of each FFN neuron: (intermediate,)."""
    s = _weighted(block.ffn_out, sq_norms).pow(2).sum(0)  # columns of the output matrix
    for ref in block.ffn_in:
        s = s + _weighted(ref, sq_norms).pow(2).sum(1)  # rows of each input matrix
    return s.sqrt()


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores, stable=True).indices[:k].tolist())


@torch.no_grad()
def remove_heads_(
    model: HFModule,
    block: BlockView,
    count: int,
    sq_norms: dict[str, torch.Tensor] | None = None,
    units: list[int] | None = None,
) -> list[int]:
    """Remove the ``count`` least important heads (Llama: KV groups) of ``block`` in place.

    Args:
        units: the units to remove, chosen by the caller (e.g. :func:`obs_remove_groups`); ``None`` ranks by
            :func:`head_scores` (magnitude, or Wanda with ``sq_norms``).

    Returns:
        removed unit indices (query-head indices for MHA models, KV-group indices for Llama).
    """
    if units is None and count <= 0:
        return []
    g = block.geometry
    units = _lowest(head_scores(block, sq_norms), count) if units is None else sorted(units)
    if block.family in ("bert", "gpt2", "distilbert"):
        # already-pruned heads keep their original numbering in prune_heads; map current -> original indices
        done = sorted(model.config.pruned_heads.get(block.index, [])) if model.config.pruned_heads else []
        orig = [h for h in range(g.num_heads + len(done)) if h not in done]
        if g.v_head_dim is not None:  # narrowed q/k (qk_dims): HF's prune_heads would slice q/k at the v width
            _prune_heads_narrow_qk(model, block, [orig[u] for u in units], units)
        else:
            model.prune_heads({block.index: [orig[u] for u in units]})
        return units
    if block.family != "llama":
        raise NotImplementedError(f"structured head removal is not implemented for family {block.family!r}")
    hd, G = g.head_dim, g.group_size
    keep_kv = [u for u in range(g.num_kv_heads) if u not in units]
    kv_idx = torch.cat([torch.arange(u * hd, (u + 1) * hd) for u in keep_kv])
    q_idx = torch.cat([torch.arange(u * G * hd, (u + 1) * G * hd) for u in keep_kv])
    a = block.attention
    a.q_proj = _prune_linear(a.q_proj, q_idx, dim=0)
    a.k_proj = _prune_linear(a.k_proj, kv_idx, dim=0)
    a.v_proj = _prune_linear(a.v_proj, kv_idx, dim=0)
    a.o_proj = _prune_linear(a.o_proj, q_idx, dim=1)
    cfg = model.config
    cfg.head_dim = hd  # pin: scale stays 1/sqrt(hd) after num_attention_heads shrinks
    cfg.num_key_value_heads = len(keep_kv)
    cfg.num_attention_heads = len(keep_kv) * G
    return units


def _prune_heads_narrow_qk(model: HFModule, block: BlockView, original: list[int], current: list[int]) -> None:
    """``prune_heads`` for a BERT self-attention with narrowed q/k: q/k rows at their width, v rows / o columns at hd.

    Records the heads like ``PreTrainedModel.prune_heads`` (``config.pruned_heads``, ``attention.pruned_heads``), so
    ``from_pretrained`` replays the removal on the dense-width module before the narrow q/k are rebuilt.
    """
    g, att = block.geometry, block.attention
    sa = att.self
    keep = [h for h in range(g.num_heads) if h not in set(current)]  # current (post-removal numbering) heads

    def rows(width: int) -> torch.Tensor:
        return torch.cat([torch.arange(h * width, (h + 1) * width) for h in keep])

    sa.query = _prune_linear(sa.query, rows(g.head_dim))
    sa.key = _prune_linear(sa.key, rows(g.head_dim))
    sa.value = _prune_linear(sa.value, rows(g.value_head_dim))
    att.output.dense = _prune_linear(att.output.dense, rows(g.value_head_dim), dim=1)
    sa.num_attention_heads = len(keep)
    sa.all_head_size = len(keep) * sa.attention_head_size
    att.pruned_heads = att.pruned_heads.union(original)
    layer_heads = set(model.config.pruned_heads.get(block.index, [])) | set(original)
    model.config.pruned_heads[block.index] = sorted(layer_heads)


@torch.no_grad()
def remove_ffn_neurons_(
    model: HFModule,
    block: BlockView,
    count: int,
    sq_norms: dict[str, torch.Tensor] | None = None,
    units: list[int] | None = None,
) -> list[int]:
    """Remove the ``count`` least important FFN neurons of ``block`` in place; returns their indices.

    ``units`` (the neurons to remove, chosen by the caller) overrides the ranking by :func:`ffn_scores`.
    """
    if units is None and count <= 0:
        return []
    width = block.ffn_out.in_features
    drop = set(_lowest(ffn_scores(block, sq_norms), count)) if units is None else set(units)
    keep = torch.tensor([i for i in range(width) if i not in drop], dtype=torch.long)
    fam, layer = block.family, block.layer
    if fam in ("bert",):
        layer.intermediate.dense = _prune_linear(layer.intermediate.dense, keep, dim=0)
        layer.output.dense = _prune_linear(layer.output.dense, keep, dim=1)
        model.config.intermediate_size = keep.numel()
    elif fam == "distilbert":
        layer.ffn.lin1 = _prune_linear(layer.ffn.lin1, keep, dim=0)
        layer.ffn.lin2 = _prune_linear(layer.ffn.lin2, keep, dim=1)
        model.config.hidden_dim = keep.numel()
    elif fam == "gpt2":
        # Conv1D stores (in, out): the FFN neurons are c_fc's output columns (dim 1) and c_proj's input rows (dim 0)
        layer.mlp.c_fc = _prune_conv1d(layer.mlp.c_fc, keep, dim=1)
        layer.mlp.c_proj = _prune_conv1d(layer.mlp.c_proj, keep, dim=0)
        model.config.n_inner = keep.numel()
    elif fam == "llama":
        mlp = layer.mlp
        mlp.gate_proj = _prune_linear(mlp.gate_proj, keep, dim=0)
        mlp.up_proj = _prune_linear(mlp.up_proj, keep, dim=0)
        mlp.down_proj = _prune_linear(mlp.down_proj, keep, dim=1)
        model.config.intermediate_size = keep.numel()
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep.numel()
    else:
        raise NotImplementedError(f"structured FFN removal is not implemented for family {fam!r}")
    return sorted(drop)


# ------------------------------------------------------------------------------------------------------------
# OBS group removal with compensation (method "sparsegpt" for the structured pattern)


def augmented_hessian(hessian: torch.Tensor, sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """(in+1, in+1) ``(2/N) [X 1]^T [X 1]`` from ``H = (2/N) X^T X``, ``sum_t x_t`` and ``N``.

    The constant column lets the compensation move the matrix's bias too (it is never removed).
    """
    n = max(int(tokens), 1)
    d = hessian.shape[0]
    out = torch.empty(d + 1, d + 1, dtype=torch.float64)
    out[:d, :d] = hessian.double()
    out[:d, d] = out[d, :d] = 2.0 * sums.double() / n
    out[d, d] = 2.0
    return out


@torch.no_grad()
def obs_remove_groups(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    groups: list[torch.Tensor],
    count: int,
    *,
    percdamp: float = 0.01,
    steps: int = 64,
) -> tuple[torch.Tensor, list[int]]:
    """Greedily remove ``count`` column groups of ``weight`` and re-solve the rest (structured OBS).

    For ``y = W x`` with input second moment ``H``, removing the column set ``R`` and re-fitting the others
    optimally costs ``tr(W_R [H^-1]_RR^-1 W_R^T)`` (the group form of Optimal Brain Surgeon, as in ZipLM /
    SparseGPT); the best update is ``W <- W - W_R [H^-1]_RR^-1 [H^-1]_R:`` and ``H^-1`` is downdated the same
    way. Each step removes the cheapest remaining group given the groups already removed.

    Args:
        weight: (out, in) matrix; columns past the groups (e.g. an appended bias column) are re-fitted only.
        hessian: (in, in) input second moment ``(2/N) X^T X`` (or the augmented one).
        groups: disjoint column-index tensors, one per removable unit (a head's columns, one FFN neuron).
        count: how many groups to remove.
        percdamp: ``percdamp * mean(diag H)`` added to the diagonal before inverting.
        steps: single-column groups (FFN neurons) are removed in at most this many joint OBS updates of the
            cheapest ``ceil(count / steps)`` columns; multi-column groups (heads) go one at a time.

    Returns:
        (new (out, in) float64 weight with the removed columns zeroed, sorted removed group indices).
    """
    W = weight.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs never active: any weight there is free
    H[dead, dead] = 1.0
    H.diagonal().add_(percdamp * float(torch.diag(H).mean()))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    alive = list(range(len(groups)))
    removed: list[int] = []
    count = min(count, len(groups))
    single = all(g.numel() == 1 for g in groups)
    idx_all = torch.cat(groups) if single else None
    while len(removed) < count:
        if single:
            # vectorized scores ||W[:, j]||^2 / [H^-1]_jj; the `batch` cheapest go together (one joint OBS update
            # per batch: each (in, in) downdate is memory-bound, 768 one-by-one updates of a 1.5k FFN took 8 s)
            batch = min(count - len(removed), max(1, -(-count // steps)))
            assert idx_all is not None  # set when single
            cols = idx_all[alive]
            err = W[:, cols].pow(2).sum(0) / Hinv[cols, cols]
            picks = [alive[int(i)] for i in torch.topk(err, batch, largest=False).indices]
        else:
            errs = []
            for g in alive:
                R = groups[g]
                WR = W[:, R]
                errs.append(float((WR @ torch.linalg.inv(Hinv[R][:, R]) * WR).sum()))
            picks = [alive[min(range(len(errs)), key=errs.__getitem__)]]
        R = torch.cat([groups[g] for g in picks])
        S = torch.linalg.inv(Hinv[R][:, R])  # (|R|, |R|)
        row = Hinv[R, :]  # (|R|, in)
        W -= (W[:, R] @ S) @ row
        Hinv -= Hinv[:, R] @ S @ row
        W[:, R] = 0.0
        for g in picks:
            alive.remove(g)
        removed.extend(picks)
    return W, sorted(removed)


@torch.no_grad()
def obs_select_and_compensate(
    ref: MatrixRef,
    hessian: torch.Tensor,
    sums: torch.Tensor,
    tokens: int,
    group_size: int,
    count: int,
    *,
    percdamp: float = 0.01,
) -> list[int]:
    """Choose ``count`` input groups of ``ref`` (an output matrix: o_proj or the FFN's down projection) by OBS,
    write the compensated weight (and bias, through a constant input column) back, and return the groups.

    The removed columns are left at zero; the caller then slices them away (``remove_heads_`` /
    ``remove_ffn_neurons_`` with ``units=``), so the remaining columns keep their re-fitted values.

    Args:
        ref: the matrix whose inputs are the units (head outputs / FFN activations), (out, in).
        hessian, sums, tokens: its calibration statistics (``LayerStats.hessians/sums/tokens``).
        group_size: columns per unit (``group_size * num_kv_heads * head_dim`` for heads, 1 for FFN).
        count: units to remove.
    """
    W = ref.weight.double()
    n_in = W.shape[1]
    bias = ref.bias
    if bias is not None:
        W = torch.cat([W, bias.double().reshape(-1, 1)], dim=1)  # (out, in + 1): bias as a constant input
        H = augmented_hessian(hessian, sums, tokens)
    else:
        H = hessian
    groups = [torch.arange(u * group_size, (u + 1) * group_size) for u in range(n_in // group_size)]
    new, removed = obs_remove_groups(W, H, groups, count, percdamp=percdamp)
    ref.weight = new[:, :n_in]
    if bias is not None:
        ref.bias = new[:, n_in]
    return removed
