"""Config validation, the prune_model contract (progress, errors, JSON metrics) and the fidelity metrics."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from pipeline.pruning import PruneConfig, blocks, prune_model
from pipeline.pruning.metrics import attention_error, eager_attention, layer_output_error, sparsity_report

from .conftest import FAMILIES, random_batches, tiny_model


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, "1.0"),
        ({"sparsity": -0.1}, "-0.1"),
        ({"method": "obs"}, "obs"),
        ({"sparsty": 0.3}, "sparsty"),
        ({"pattern": "n:m", "n": 4, "m": 4}, "n=4"),
        ({"pattern": "n:m", "n": 2, "m": 4, "sparsity": 0.3}, "0.3"),
        ({"pattern": "structured", "targets": "qk"}, "removes nothing"),
        ({"pattern": "structured", "structured_unit": "heads+qk"}, "structured_unit"),
        ({"method": "wanda", "error_correction": True}, "reconstructing method"),
        ({"correction_ridge": -1.0}, "correction_ridge"),
        ({"method": "sparsegpt", "error_correction": True, "sequential": False}, "sequential"),
        ({"blocksize": 0}, "blocksize"),
    ],
)
def test_config_rejects_bad_values_and_quotes_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize(
    "cfg",
    [
        PruneConfig(),
        PruneConfig(method="wanda", pattern="n:m", n=4, m=8),
        PruneConfig(pattern="structured", sparsity=0.25),
        PruneConfig(method="sparsegpt", targets="ffn", sequential=False, blocksize=64, percdamp=0.05),
    ],
)
def test_config_json_round_trip_and_frozen(cfg):
    assert PruneConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    with pytest.raises(ValidationError, match="frozen"):
        cfg.sparsity = 0.1  # frozen
    assert PruneConfig(pattern="n:m", n=1, m=4).effective_sparsity == pytest.approx(0.75)


def test_config_attention_options():
    try:
        from pipeline.pruning.attention_objective import AttentionMethodConfig
    except ModuleNotFoundError:
        AttentionMethodConfig = None
    if AttentionMethodConfig is None:
        assert PruneConfig(method="attention", attention={}).attention == {}
        with pytest.raises(ValueError, match="lambda_reg"):
            PruneConfig(method="attention", attention={"lambda_reg": 0.1})
    else:
        cfg = PruneConfig(method="attention", attention={"companion": "sparsegpt"})
        assert isinstance(cfg.attention_options, AttentionMethodConfig)
        assert PruneConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
        with pytest.raises(ValueError):
            PruneConfig(method="attention", attention={"no_such_option": 1})


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_model_contract(family):
    model = tiny_model(family)
    calls = []
    cal = random_batches(2)
    res = prune_model(
        model,
        PruneConfig(method="wanda", sparsity=0.5),
        cal,
        eval_batches=random_batches(1, seed=9),
        progress=lambda stage, i, n: calls.append((stage, i, n)),
    )
    assert res.model is model
    assert calls == [("prune", 1, 2), ("prune", 2, 2)]
    m = json.loads(json.dumps(res.metrics))  # JSON-serializable
    assert m["method"] == "wanda" and m["pattern"] == "unstructured"
    # per-row floor: BERT's 37-wide FFN output keeps 19 of 37 per row
    assert set(m["parts"]) == {"qk", "vo", "ffn"} and all(
        v == pytest.approx(0.5, abs=0.015) for v in m["parts"].values()
    )
    assert len(m["attention_error"]["per_layer"]) == 2 and len(m["layer_output_error"]) == 2
    assert 0 < m["attention_error"]["mean"] < 1 and m["attention_error"]["row_kl_mean"] > 0
    assert all(0 < e < 1.5 for e in m["layer_output_error"]) and m["seconds"] > 0


def test_nothing_pruned_raises_and_zero_sparsity_is_a_noop():
    cal = random_batches(1)
    with pytest.raises(ValueError, match="pruned nothing"):
        # Wanda compares per row: floor(0.02 * 32) = 0 weights per row
        prune_model(tiny_model("bert"), PruneConfig(method="wanda", sparsity=0.02), cal)
    model = tiny_model("bert")
    ref = copy.deepcopy(model)
    prune_model(model, PruneConfig(method="wanda", sparsity=0.0), cal)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n


def test_attention_method_wiring():
    pytest.importorskip("pipeline.pruning.attention_objective")
    model = tiny_model("llama")
    cal = random_batches(2)
    cfg = PruneConfig(
        method="attention", sparsity=0.5, attention={"companion": "wanda", "mask_steps": 3, "refit_steps": 3}
    )
    res = prune_model(model, cfg, cal)
    for b in blocks(model):
        for role, r in b.matrices().items():
            assert int((r.weight == 0).sum()) == r.weight.numel() // 2, role  # q/k by prune_qk, rest by Wanda
    assert "qk_stats" in res.metrics["per_layer"][0]


def test_attention_method_n_m_keeps_n_of_every_m():
    """One n:m convention across the driver and prune_qk: 1:4 keeps one weight in every group of four."""
    model = tiny_model("llama")
    cfg = PruneConfig(
        method="attention", pattern="n:m", n=1, m=4, targets="qk", attention={"mask_steps": 2, "refit_steps": 2}
    )
    prune_model(model, cfg, random_batches(2))
    for b in blocks(model):
        for role in ("q", "k"):
            w = b.matrices()[role].weight
            groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 1 and float((w == 0).float().mean()) == pytest.approx(0.75), role


def test_metrics_against_manual_oracles():
    dense = tiny_model("gpt2")
    pruned = copy.deepcopy(dense)
    batches = random_batches(2)
    zero = attention_error(dense, pruned, batches)
    assert zero["mean"] == 0.0 and zero["row_kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert layer_output_error(dense, pruned, batches) == [0.0, 0.0]
    with torch.no_grad():
        pruned.transformer.h[1].attn.c_attn.weight.mul_(1.7)  # changes layer-1 attention only
    err = attention_error(dense, pruned, batches)
    assert err["per_layer"][0] == 0.0 and err["per_layer"][1] > 0
    num = den = 0.0
    with eager_attention(dense), eager_attention(pruned):
        for b in batches:
            A = dense(**b, output_attentions=True, use_cache=False).attentions[1].double()
            Ah = pruned(**b, output_attentions=True, use_cache=False).attentions[1].double()
            pad = b["attention_mask"].bool()
            for i in range(A.shape[0]):
                r = pad[i]
                a, ah = A[i][:, r][:, :, r], Ah[i][:, r][:, :, r]  # (H, real, real)
                num += float(((a - ah) ** 2).sum().detach())
                den += float((a**2).sum())
    assert err["per_layer"][1] == pytest.approx((num / den) ** 0.5, rel=1e-9)
    out_err = layer_output_error(dense, pruned, batches)
    assert out_err[0] == 0.0 and out_err[1] > 0
    rep = sparsity_report(dense, {"a": torch.tensor([0.0, 1.0]), "b": torch.zeros(2)})
    assert rep == {"a": 0.5, "b": 1.0, "overall": 0.75}
