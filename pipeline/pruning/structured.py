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
(``|W_ij| * ||X_j||``, with each matrix's own input norms), i.e. an activation-weighted norm.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import prune_conv1d_layer, prune_linear_layer

from pipeline.pruning.adapters import BlockView, MatrixRef

__all__ = ["units_to_remove", "head_scores", "ffn_scores", "remove_heads_", "remove_ffn_neurons_"]

logger = logging.getLogger(__name__)


def units_to_remove(total: int, sparsity: float) -> int:
    """Units removed from ``total`` at ``sparsity``: ``round(sparsity * total)``, at least 1 kept."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return min(total - 1, int(math.floor(sparsity * total + 0.5)))


def _weighted(ref: MatrixRef, sq_norms: Optional[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(out, in) float64 |W| (magnitude) or |W| * ||X_j|| (wanda) for one matrix."""
    w = ref.weight.double().abs()
    if sq_norms is None:
        return w
    return w * sq_norms[ref.role].double().clamp_min(0).sqrt().reshape(1, -1)


def head_scores(block: BlockView, sq_norms: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Importance of each removable attention unit: (num_kv_heads,) for GQA/MHA (a KV head with its query group).

    Args:
        block: block view.
        sq_norms: role -> (in,) squared input norms for wanda ranking, or None for magnitude.
    """
    g = block.geometry
    hd, G = g.head_dim, g.group_size
    q = _weighted(block.q, sq_norms).pow(2).sum(1).reshape(g.num_kv_heads, G * hd).sum(1)  # q rows of each group
    k = _weighted(block.k, sq_norms).pow(2).sum(1).reshape(g.num_kv_heads, hd).sum(1)
    v = _weighted(block.v, sq_norms).pow(2).sum(1).reshape(g.num_kv_heads, hd).sum(1)
    o = _weighted(block.o, sq_norms).pow(2).sum(0).reshape(g.num_kv_heads, G * hd).sum(1)  # o columns of the group
    return (q + k + v + o).sqrt()


def ffn_scores(block: BlockView, sq_norms: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """Importance of each FFN neuron: (intermediate,)."""
    s = _weighted(block.ffn_out, sq_norms).pow(2).sum(0)  # columns of the output matrix
    for ref in block.ffn_in:
        s = s + _weighted(ref, sq_norms).pow(2).sum(1)  # rows of each input matrix
    return s.sqrt()


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores, stable=True).indices[:k].tolist())


@torch.no_grad()
def remove_heads_(
    model: nn.Module, block: BlockView, count: int, sq_norms: Optional[dict[str, torch.Tensor]] = None
) -> list[int]:
    """Remove the ``count`` least important heads (Llama: KV groups) of ``block`` in place.

    Returns:
        removed unit indices (query-head indices for MHA models, KV-group indices for Llama).
    """
    if count <= 0:
        return []
    g = block.geometry
    units = _lowest(head_scores(block, sq_norms), count)
    if block.family in ("bert", "gpt2", "distilbert"):
        # already-pruned heads keep their original numbering in prune_heads; map current -> original indices
        done = sorted(model.config.pruned_heads.get(block.index, [])) if model.config.pruned_heads else []
        orig = [h for h in range(g.num_heads + len(done)) if h not in done]
        model.prune_heads({block.index: [orig[u] for u in units]})
        return units
    if block.family != "llama":
        raise NotImplementedError(f"structured head removal is not implemented for family {block.family!r}")
    hd, G = g.head_dim, g.group_size
    keep_kv = [u for u in range(g.num_kv_heads) if u not in units]
    kv_idx = torch.cat([torch.arange(u * hd, (u + 1) * hd) for u in keep_kv])
    q_idx = torch.cat([torch.arange(u * G * hd, (u + 1) * G * hd) for u in keep_kv])
    a = block.attention
    a.q_proj = prune_linear_layer(a.q_proj, q_idx, dim=0)
    a.k_proj = prune_linear_layer(a.k_proj, kv_idx, dim=0)
    a.v_proj = prune_linear_layer(a.v_proj, kv_idx, dim=0)
    a.o_proj = prune_linear_layer(a.o_proj, q_idx, dim=1)
    cfg = model.config
    cfg.head_dim = hd  # pin: scale stays 1/sqrt(hd) after num_attention_heads shrinks
    cfg.num_key_value_heads = len(keep_kv)
    cfg.num_attention_heads = len(keep_kv) * G
    return units


@torch.no_grad()
def remove_ffn_neurons_(
    model: nn.Module, block: BlockView, count: int, sq_norms: Optional[dict[str, torch.Tensor]] = None
) -> list[int]:
    """Remove the ``count`` least important FFN neurons of ``block`` in place; returns their indices."""
    if count <= 0:
        return []
    scores = ffn_scores(block, sq_norms)
    drop = set(_lowest(scores, count))
    keep = torch.tensor([i for i in range(scores.numel()) if i not in drop], dtype=torch.long)
    fam, layer = block.family, block.layer
    if fam in ("bert",):
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, keep, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, keep, dim=1)
        model.config.intermediate_size = keep.numel()
    elif fam == "distilbert":
        layer.ffn.lin1 = prune_linear_layer(layer.ffn.lin1, keep, dim=0)
        layer.ffn.lin2 = prune_linear_layer(layer.ffn.lin2, keep, dim=1)
        model.config.hidden_dim = keep.numel()
    elif fam == "gpt2":
        # Conv1D stores (in, out): the FFN neurons are c_fc's output columns (dim 1) and c_proj's input rows (dim 0)
        layer.mlp.c_fc = prune_conv1d_layer(layer.mlp.c_fc, keep, dim=1)
        layer.mlp.c_proj = prune_conv1d_layer(layer.mlp.c_proj, keep, dim=0)
        model.config.n_inner = keep.numel()
    elif fam == "llama":
        mlp = layer.mlp
        mlp.gate_proj = prune_linear_layer(mlp.gate_proj, keep, dim=0)
        mlp.up_proj = prune_linear_layer(mlp.up_proj, keep, dim=0)
        mlp.down_proj = prune_linear_layer(mlp.down_proj, keep, dim=1)
        model.config.intermediate_size = keep.numel()
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep.numel()
    else:
        raise NotImplementedError(f"structured FFN removal is not implemented for family {fam!r}")
    return sorted(drop)
