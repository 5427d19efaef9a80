"""Adapters (uniform (out, in) views, geometry) and magnitude pruning through the driver."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.pruning import PruneConfig, blocks, magnitude_prune, prune_model
from pipeline.pruning.adapters import ROLES_BY_TARGET
from pipeline.pruning.calibration import capture_first_block_inputs, collect_block_stats
from pipeline.pruning.metrics import eager_attention

from .conftest import FAMILIES, MORE_FAMILIES, random_batches, tiny_model


def _attention_from_view(block, X, pad):
    """float64 oracle: softmax attention built only from the adapter's (out, in) q/k views and geometry."""
    g = block.geometry
    X = X.double()
    B, n, _ = X.shape
    q = X @ block.q.weight.double().T + (0 if block.q.bias is None else block.q.bias.double())
    k = X @ block.k.weight.double().T + (0 if block.k.bias is None else block.k.bias.double())
    q = q.view(B, n, g.num_heads, g.head_dim).transpose(1, 2)  # (B, H, n, hd)
    k = k.view(B, n, g.num_kv_heads, g.head_dim).transpose(1, 2)  # (B, Hkv, n, hd)
    if g.rope is not None:
        pos = torch.arange(n).expand(B, n)
        q, k = g.rope(q, pos), g.rope(k, pos)
    k = k.repeat_interleave(g.group_size, dim=1)  # GQA: each KV head serves group_size query heads
    s = (q @ k.transpose(-1, -2)) * g.scale
    allowed = pad[:, None, None, :].clone()
    if g.causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1)


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES)
def test_adapter_views_reproduce_model_attention(family):
    model = tiny_model(family).double()
    batch = random_batches(1)[0]
    views = blocks(model)
    assert len(views) == 2
    inputs = capture_first_block_inputs(model, views[0], [batch])
    stats = collect_block_stats(views[0], inputs, [], keep_attn_input=True)
    with eager_attention(model):
        att = model(**batch, output_attentions=True).attentions[0]  # (B, H, n, n)
    ours = _attention_from_view(views[0], stats.attn_input, stats.attn_pad_mask)
    pad = batch["attention_mask"].bool()
    real = pad[:, None, :, None] & pad[:, None, None, :]
    assert ours.shape == att.shape
    assert torch.allclose(ours[real.expand_as(ours)], att.double()[real.expand_as(att)], atol=1e-10)
    g = views[0].geometry
    assert g.scale == pytest.approx(1 / math.sqrt(8)) and g.head_dim == 8
    assert (g.num_heads, g.num_kv_heads, g.causal) == {
        "bert": (4, 4, False),
        "gpt2": (4, 4, True),
        "llama": (4, 2, True),
        "distilbert": (4, 4, False),
        "qwen2": (4, 2, True),
    }[family]


def test_gpt2_fused_slices_are_transposed_views_with_setters():
    model = tiny_model("gpt2")
    b = blocks(model)[0]
    x = torch.randn(3, 32)
    fused = model.transformer.h[0].attn.c_attn(x)  # (3, 96) = [q | k | v]
    for i, ref in enumerate((b.q, b.k, b.v)):
        assert ref.weight.shape == (32, 32)
        assert torch.allclose(x @ ref.weight.T + ref.bias, fused[:, 32 * i : 32 * (i + 1)], atol=1e-6)
    new = torch.arange(32 * 32, dtype=torch.float32).reshape(32, 32)
    b.k.weight = new
    stored = model.transformer.h[0].attn.c_attn.weight  # (in, 3*out)
    assert torch.equal(stored[:, 32:64], new.T)
    assert not torch.equal(stored[:, :32], new.T)
    assert b.k.qualname == "transformer.h.0.attn.c_attn[k]"
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        b.q.weight = torch.zeros(3, 3)


def test_magnitude_prune_is_layerwise_not_per_row():
    w = torch.tensor([[10.0, 9.0, 8.0, 7.0], [0.1, 0.2, 0.3, 0.4]])
    new, keep = magnitude_prune(w, sparsity=0.5)
    assert keep.tolist() == [[True] * 4, [False] * 4]  # whole small row goes: threshold over the matrix
    assert torch.equal(new, w * keep)
    _new24, keep24 = magnitude_prune(w, sparsity=0.0, n=2, m=4)
    assert keep24.tolist() == [[True, True, False, False], [False, False, True, True]]


@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_unstructured_prunes_exactly_the_targets(family):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    res = prune_model(model, PruneConfig(method="magnitude", sparsity=0.5), [])
    sizes = {r.qualname: r.weight.numel() for b in blocks(model) for r in b.matrices().values()}
    per_matrix = {k: v for k, v in res.metrics["sparsity"].items() if k != "overall"}
    assert set(per_matrix) == set(sizes)
    for name, frac in per_matrix.items():
        assert frac == math.floor(0.5 * sizes[name]) / sizes[name], name  # layer-wise exact count
    assert res.metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=2e-3)
    # embeddings, norms and LM head untouched
    pruned_ids = {id(r.module) for b in blocks(model) for r in b.matrices().values()}
    mods = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner = mods[name.rsplit(".", 1)[0]]
        if id(owner) not in pruned_ids:
            assert torch.equal(p, dict(ref.named_parameters())[name]), name
    # the kept entries keep their values (magnitude never updates weights)
    for b, rb in zip(blocks(model), blocks(ref)):
        for role, r in b.matrices().items():
            w, w0 = r.weight, rb.matrices()[role].weight
            assert torch.equal(w[w != 0], w0[w != 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_2_4_along_input_dim(family):
    model = tiny_model(family)
    res = prune_model(model, PruneConfig(method="magnitude", pattern="n:m", n=2, m=4), [])
    for b in blocks(model):
        for r in b.matrices().values():
            w = r.weight  # (out, in): groups run along in, also for GPT-2's transposed Conv1D storage
            full = w.shape[1] // 4 * 4
            nz = (w[:, :full] != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert (nz <= 2).all()
            assert (nz == 2).float().mean() > 0.99  # random weights: no accidental exact zeros
    assert res.metrics["parts"]["qk"] == pytest.approx(0.5)


@pytest.mark.parametrize("targets", ["qk", "attention", "ffn"])
def test_targets_select_matrices(targets):
    model = tiny_model("llama")
    prune_model(model, PruneConfig(method="magnitude", sparsity=0.5, targets=targets), [])
    wanted = ROLES_BY_TARGET[targets]
    for b in blocks(model):
        for role, r in b.matrices().items():
            zeros = int((r.weight == 0).sum())
            if role in wanted or role.split(".")[0] in wanted:
                assert zeros == r.weight.numel() // 2
            else:
                assert zeros == 0, role
