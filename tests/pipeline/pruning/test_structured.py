"""Structured pruning: physical removal equals zeroing the removed units, configs stay uniform, reload round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.pruning import PruneConfig, blocks, prune_model
from pipeline.pruning.structured import ffn_scores, head_scores, units_to_remove

from .conftest import FAMILIES, MORE_FAMILIES, random_batches, tiny_model


def _zero_units_(dense, family, removed):
    """Oracle: in the dense copy, zero the o-columns of removed heads and ffn_out columns of removed neurons.

    A head's output reaches the residual stream only through its o columns and a neuron's only through its
    ffn_out column, so zeroing those reproduces removal exactly (q/k/v/ffn_in rows then do not matter).
    """
    for b, rec in zip(blocks(dense), removed):
        g = b.geometry
        width = g.group_size * g.head_dim  # query columns of o owned by one removable unit (a KV group)
        W = b.o.weight.clone()
        for u in rec["heads"]:
            W[:, u * width : (u + 1) * width] = 0
        b.o.weight = W
        F = b.ffn_out.weight.clone()
        F[:, rec["ffn"]] = 0
        b.ffn_out.weight = F


def _logits(model, batch):
    return model(**batch).logits


@pytest.mark.parametrize(
    "family,method",
    [(f, m) for f in FAMILIES for m in ("magnitude", "wanda")] + [(f, "wanda") for f in MORE_FAMILIES],
)
def test_structured_equals_zeroing_and_round_trips(family, method, tmp_path):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    cal = random_batches(2)
    cfg0 = copy.deepcopy(model.config)
    res = prune_model(model, PruneConfig(method=method, pattern="structured", sparsity=0.5), cal)
    per_layer = res.metrics["per_layer"]
    removed = [{"heads": p["heads_removed"], "ffn": p["ffn_removed"]} for p in per_layer]
    # the same count in every layer
    assert len({len(r["heads"]) for r in removed}) == 1 and len({len(r["ffn"]) for r in removed}) == 1
    views = blocks(model)
    g0 = blocks(dense)[0].geometry
    for b in views:
        g = b.geometry
        assert g.num_kv_heads == g0.num_kv_heads // 2 and g.group_size == g0.group_size  # GQA stays valid
        assert g.head_dim == g0.head_dim and g.scale == g0.scale  # 1/sqrt(head_dim) unchanged
        assert b.ffn_out.in_features == blocks(dense)[0].ffn_out.in_features - len(removed[0]["ffn"])
    _zero_units_(dense, family, removed)
    batch = random_batches(1, seed=5)[0]
    assert torch.allclose(_logits(model, batch), _logits(dense, batch), atol=1e-5)
    # config describes the shrunk model; save/reload gives identical outputs
    if family in ("llama", "qwen2"):
        assert model.config.num_attention_heads == cfg0.num_attention_heads // 2
        assert model.config.num_key_value_heads == cfg0.num_key_value_heads // 2
        assert model.config.head_dim == 8
    else:
        assert {int(k): len(v) for k, v in model.config.pruned_heads.items()} == {0: 2, 1: 2}
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(model, batch), _logits(reloaded, batch))
    assert res.metrics["sparsity"]["overall"] > 0.45


def test_lowest_units_are_removed():
    model = tiny_model("llama")
    b = blocks(model)[0]
    # make KV group 1 and FFN neuron 7 nearly dead: they must be the ones removed
    q, k, v, o = (r.weight.clone() for r in (b.q, b.k, b.v, b.o))
    q[16:32] *= 1e-3
    k[8:16] *= 1e-3
    v[8:16] *= 1e-3
    o[:, 16:32] *= 1e-3
    b.q.weight, b.k.weight, b.v.weight, b.o.weight = q, k, v, o
    f = b.ffn_out.weight.clone()
    f[:, 7] *= 1e-3
    b.ffn_out.weight = f
    for r in b.ffn_in:
        w = r.weight.clone()
        w[7] *= 1e-3
        r.weight = w
    assert torch.argmin(head_scores(b)).item() == 1
    assert torch.argmin(ffn_scores(b)).item() == 7
    res = prune_model(model, PruneConfig(pattern="structured", sparsity=0.5), [])
    assert res.metrics["per_layer"][0]["heads_removed"] == [1]
    assert 7 in res.metrics["per_layer"][0]["ffn_removed"]


def test_units_to_remove_and_unit_selection():
    assert units_to_remove(4, 0.5) == 2 and units_to_remove(2, 0.9) == 1 and units_to_remove(37, 0.5) == 19
    model = tiny_model("gpt2")
    res = prune_model(model, PruneConfig(pattern="structured", structured_unit="ffn", sparsity=0.25), [])
    assert res.metrics["per_layer"][0].get("heads_removed") is None
    assert model.config.n_inner == 96 and blocks(model)[0].geometry.num_heads == 4
    with pytest.raises(ValueError, match="removes nothing"):
        PruneConfig(pattern="structured", structured_unit="heads", targets="ffn")


def test_per_unit_structured_sparsity():
    model = tiny_model("bert")  # 4 heads, 37 FFN neurons per layer
    res = prune_model(model, PruneConfig(pattern="structured", sparsity=0.0, head_sparsity=0.25, ffn_sparsity=0.75), [])
    for info in res.metrics["per_layer"]:
        assert len(info["heads_removed"]) == 1 and len(info["ffn_removed"]) == 28
    assert model.config.intermediate_size == 9
    with pytest.raises(ValueError, match="structured"):
        PruneConfig(pattern="unstructured", head_sparsity=0.5)
    with pytest.raises(ValueError, match="ffn_sparsity"):
        PruneConfig(pattern="structured", ffn_sparsity=1.0)
