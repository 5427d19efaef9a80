"""Structured QK-dimension pruning: the narrow module, the choice of the narrow q/k, save/reload, export."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.pruning import PruneConfig, QKReducedSelfAttention, blocks, prune_model, reduce_qk
from pipeline.pruning.attention_objective import AttentionMethodConfig, qk_attention
from pipeline.pruning.qk_dims import QK_DIMS_KEY, _svd_init, qk_keep

from .conftest import random_batches, tiny_model


def _hidden(model, batch):
    return model(**batch, output_hidden_states=True).hidden_states[-1]


def _block_inputs(model, batches):
    """(X (B, n, d) entering block 0, pad mask (B, n)) over all batches, as the driver collects them."""
    with torch.no_grad():
        xs = [model(**b, output_hidden_states=True).hidden_states[0] for b in batches]
    return torch.cat(xs), torch.cat([b["attention_mask"].bool() for b in batches])


@pytest.mark.parametrize("seq", [1, 7, 13])
def test_module_at_full_width_equals_bert_self_attention(seq):
    """Oracle: with r = hd and the dense weights copied, the narrow module is BERT's own self-attention."""
    model = tiny_model("bert")
    sa = model.bert.encoder.layer[0].attention.self
    new = QKReducedSelfAttention(sa, sa.attention_head_size)
    with torch.no_grad():
        new.query.load_state_dict(sa.query.state_dict())
        new.key.load_state_dict(sa.key.state_dict())
    x = torch.randn(3, seq, 32, dtype=torch.float32)
    mask = torch.zeros(3, 1, 1, seq)
    mask[-1, ..., seq // 2 + 1 :] = torch.finfo(torch.float32).min  # right padding in the last row (HF additive mask)
    ref_ctx, ref_probs = sa.__class__.__mro__[0].forward(sa, x, attention_mask=mask, output_attentions=True)
    for out_att in (False, True):  # SDPA path and the explicit-probabilities path
        ctx, probs = new(x, attention_mask=mask, output_attentions=out_att)
        torch.testing.assert_close(ctx, ref_ctx, atol=1e-5, rtol=1e-5)
        if out_att:
            torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
        else:
            assert probs is None


def test_module_rejects_cross_attention_and_caches():
    model = tiny_model("bert")
    new = QKReducedSelfAttention(model.bert.encoder.layer[0].attention.self, 4)
    x = torch.randn(1, 5, 32)
    with pytest.raises(NotImplementedError, match="cross-attention"):
        new(x, encoder_hidden_states=x)


def test_qk_keep_rounds_and_keeps_one():
    assert qk_keep(32, 0.5) == 16 and qk_keep(8, 0.3) == 6 and qk_keep(8, 0.99) == 1 and qk_keep(8, 0.0) == 8
    with pytest.raises(ValueError):
        qk_keep(8, 1.0)


def _logit_error(dense, new, x):
    """Σ over all token pairs (i, j) of the squared logit error of every head, float64 (the SVD's metric)."""
    H = 4
    xa = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    aq = lambda w, b: torch.cat([w.double(), b.double()[:, None]], 1)  # noqa: E731
    total = 0.0
    for h in range(H):
        hd0, hd1 = dense[0].shape[0] // H, new[0].shape[0] // H
        B0 = aq(dense[0], dense[1])[h * hd0 : (h + 1) * hd0].T @ aq(dense[2], dense[3])[h * hd0 : (h + 1) * hd0]
        B1 = aq(new[0], new[1])[h * hd1 : (h + 1) * hd1].T @ aq(new[2], new[3])[h * hd1 : (h + 1) * hd1]
        total += float((xa @ (B0 - B1) @ xa.T).pow(2).sum())
    return total


def test_svd_init_is_the_best_rank_r_logit_approximation():
    """Oracle: no subset of coordinate dims (exhaustive, hd=8, r=3) has a smaller all-pairs logit error than the SVD,
    and at r = hd the SVD reproduces the dense logits."""
    torch.manual_seed(0)
    d, H, hd, r = 32, 4, 8, 3
    dense = (
        torch.randn(H * hd, d) * 0.3,
        torch.randn(H * hd) * 0.3,
        torch.randn(H * hd, d) * 0.3,
        torch.randn(H * hd) * 0.3,
    )
    x = torch.randn(200, d) @ torch.randn(d, d) * 0.3 + 0.5  # correlated, non-centred inputs
    full = _svd_init(dense, x, H, hd, hd, damp=0.0)
    assert _logit_error(dense, full, x) < 1e-8 * _logit_error(dense, tuple(torch.zeros_like(t) for t in dense), x)
    svd = _svd_init(dense, x, H, hd, r, damp=0.0)
    best_subset = math.inf
    for keep in itertools.combinations(range(hd), r):  # the same subset in every head; per-head error adds up
        rows = torch.tensor([h * hd + j for h in range(H) for j in keep])
        sub = tuple(t[rows] for t in dense)
        best_subset = min(best_subset, _logit_error(dense, sub, x))
    assert _logit_error(dense, svd, x) < best_subset


def test_svd_init_without_biases():
    torch.manual_seed(1)
    dense = (torch.randn(16, 12), None, torch.randn(16, 12), None)
    x = torch.randn(50, 12)
    wq, bq, wk, bk = _svd_init(dense, x, 2, 8, 8, damp=0.0)
    assert bq is None and bk is None
    torch.testing.assert_close(
        x @ wq[:8].T @ (x @ wk[:8].T).T, x @ dense[0][:8].T @ (x @ dense[2][:8].T).T, atol=1e-3, rtol=1e-4
    )


def test_attention_choice_beats_norm_criteria_and_refit_never_hurts_heldout():
    model = tiny_model("bert")
    b = blocks(model)[0]
    X, pm = _block_inputs(model, random_batches(6, batch=4, seq=13, seed=3))
    args = (b.q.weight, b.q.bias, b.k.weight, b.k.bias, X, pm, b.geometry)
    errs = {}
    for method in ("magnitude", "wanda", "attention"):
        res = reduce_qk(*args, keep=4, method=method)
        assert res.wq.shape == (16, 32) and res.bk.shape == (16,)
        narrow = b.geometry.__class__(4, 4, 4, False, b.geometry.scale, v_head_dim=8)
        F = qk_attention(res.wq, res.bq, res.wk, res.bk, X, pm, narrow)
        F0 = qk_attention(*args[:4], X, pm, b.geometry)
        errs[method] = float((F - F0).norm() / F0.norm())
        if method == "attention":
            st = res.stats
            assert st["attn_err_holdout_final"] <= st["attn_err_holdout_init"] + 1e-7
    assert errs["attention"] < errs["wanda"] and errs["attention"] < errs["magnitude"]
    # the greedy coordinate selection (the probe's method) is a valid, weaker start
    greedy = reduce_qk(*args, keep=4, method="attention", cfg=AttentionMethodConfig(qk_init="greedy", refit=False))
    assert len(greedy.stats["qk_kept_dims"]) == 4 and all(len(r) == 4 for r in greedy.stats["qk_kept_dims"])


def test_the_width_criterion_is_the_registered_rule_not_the_name():
    """reduce_qk asks the method's registered QKWidthRule: a new method declaring Wanda's criterion picks Wanda's
    dimensions; a method without a criterion, or one reading activations without them, is refused."""
    from pipeline.pruning.registry import PRUNE_METHODS, PruneMethod, QKWidthRule, register_qk_method

    model = tiny_model("bert")
    b = blocks(model)[0]
    X, pm = _block_inputs(model, random_batches(2, batch=2, seq=9, seed=5))
    args = (b.q.weight, b.q.bias, b.k.weight, b.k.bias, X, pm, b.geometry)
    rule = QKWidthRule(activation_norms=True)
    register_qk_method(PruneMethod("toy_qk", "(test)", qk_rule=lambda *a: None, qk_width_rule=rule))
    try:
        toy, wanda = reduce_qk(*args, keep=3, method="toy_qk"), reduce_qk(*args, keep=3, method="wanda")
        assert toy.stats["qk_kept_dims"] == wanda.stats["qk_kept_dims"] and torch.equal(toy.wq, wanda.wq)
        with pytest.raises(ValueError, match="needs calibration inputs"):
            reduce_qk(*args[:4], None, None, b.geometry, keep=3, method="toy_qk")
    finally:
        PRUNE_METHODS.pop("toy_qk")
    with pytest.raises(ValueError, match=r"q/k-width criterion \['attention', 'magnitude', 'wanda'\], got 'sparsegpt'"):
        reduce_qk(*args, keep=3, method="sparsegpt")


def test_magnitude_qk_dims_equals_zeroing_the_dropped_dims():
    """Oracle: removing coordinate dims physically = zeroing those q and k rows (their q_d k_d terms vanish)."""
    model = tiny_model("bert")
    dense = copy.deepcopy(model)
    prune_model(
        model, PruneConfig(method="magnitude", pattern="structured", structured_unit="qk_dims", sparsity=0.5), []
    )
    for bd in blocks(dense):
        q, k = bd.q.weight, bd.k.weight
        score = (q.norm(dim=1) * k.norm(dim=1)).reshape(4, 8)
        drop = torch.topk(score, 4, dim=1, largest=False).indices
        rows = (torch.arange(4)[:, None] * 8 + drop).reshape(-1)
        for ref in (bd.q, bd.k):
            w, bias = ref.weight.clone(), ref.bias.clone()
            w[rows] = 0
            bias[rows] = 0
            ref.weight, ref.bias = w, bias
    batch = random_batches(1)[0]
    torch.testing.assert_close(model(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=1e-5)
    for b in blocks(model):
        assert b.q.weight.shape == (16, 32) and b.geometry.head_dim == 4 and b.geometry.value_head_dim == 8
        assert b.geometry.scale == pytest.approx(1 / math.sqrt(8))  # the dense scale is kept
    assert getattr(model.config, QK_DIMS_KEY) == {"0": 4, "1": 4}


@pytest.mark.parametrize("units,correction", [("qk_dims", None), ("qk_dims+heads+ffn", True)])
def test_save_reload_round_trip_and_export_parity(units, correction, tmp_path):
    import onnxruntime as ort

    from exporters.onnx import dummy_feeds, export_onnx, torch_reference
    from pipeline.models import load_model, save_model
    from tests.helpers import make_tiny_model

    lm = load_model(make_tiny_model(tmp_path / "m", "bert", initializer_range=0.2))
    cal = random_batches(3, vocab=lm.model.config.vocab_size)
    # correction=True: the true-sequential corrected path (q/k widths aim at the dense stream's attention)
    res = prune_model(
        lm.model,
        PruneConfig(
            method="attention", pattern="structured", structured_unit=units, sparsity=0.5, error_correction=correction
        ),
        cal,
    )
    n_layers = len(blocks(lm.model))
    assert [u.get("qk_width") for u in res.metrics["removed_units"]] == [[8, 4]] * n_layers
    assert res.metrics["parts"]["qk"] > 0.49
    save_model(lm, tmp_path / "p")
    back = load_model(tmp_path / "p")
    batch = cal[0]
    torch.testing.assert_close(back.model(**batch).last_hidden_state, lm.model(**batch).last_hidden_state)
    assert all(b.geometry.head_dim == 4 for b in blocks(back.model))
    if correction:  # once is enough: optimum re-loads with plain transformers and must refuse, not mis-load
        from exporters.onnx import ExportError

        with pytest.raises(ExportError, match="exporter 'dynamo'"):
            export_onnx(back, tmp_path / "onnx-optimum", exporter="optimum")
    out = export_onnx(back, tmp_path / "onnx")
    feeds = dummy_feeds(out, 2, 9)
    ref = torch_reference(back, feeds)
    got = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, r in zip(got, ref.values()):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)


def test_reload_refuses_a_corrupt_width_record(tmp_path):
    import json

    from pipeline.models import ModelLoadError, load_model, save_model
    from tests.helpers import make_tiny_model

    lm = load_model(make_tiny_model(tmp_path / "m", "bert"))
    prune_model(
        lm.model, PruneConfig(method="magnitude", pattern="structured", structured_unit="qk_dims", sparsity=0.5), []
    )
    save_model(lm, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg[QK_DIMS_KEY]["0"] = 3  # the weights are 4 wide
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"query.weight"):
        load_model(tmp_path / "p")


def test_heads_after_qk_dims_equal_zeroing_their_outputs():
    """Heads removed from a narrowed block: same model as zeroing their o columns in the narrowed-only model."""
    model = tiny_model("bert")
    cal = random_batches(2)
    narrow_only = copy.deepcopy(model)
    # one-shot protocol: every layer sees dense inputs, so both runs narrow the same q/k dims
    prune_model(
        narrow_only,
        PruneConfig(method="wanda", pattern="structured", structured_unit="qk_dims", sparsity=0.5, sequential=False),
        cal,
    )
    res = prune_model(
        model,
        PruneConfig(
            method="wanda", pattern="structured", structured_unit="qk_dims+heads", sparsity=0.5, sequential=False
        ),
        cal,
    )
    for b, rec in zip(blocks(narrow_only), res.metrics["removed_units"]):
        W = b.o.weight.clone()
        for u in rec["heads"]:
            W[:, u * 8 : (u + 1) * 8] = 0
        b.o.weight = W
    for b in blocks(model):
        assert b.geometry.num_heads == 2 and b.q.weight.shape == (8, 32) and b.v.weight.shape == (16, 32)
    batch = random_batches(1, seed=5)[0]
    torch.testing.assert_close(model(**batch).logits, narrow_only(**batch).logits, atol=1e-5, rtol=1e-5)


def test_config_validation_and_unsupported_families():
    with pytest.raises(ValueError, match="structured_unit"):
        PruneConfig(pattern="structured", structured_unit="heads+bogus")
    with pytest.raises(ValueError, match="structured_unit"):
        PruneConfig(pattern="structured", structured_unit="ffn+ffn")
    with pytest.raises(ValueError, match="sparsegpt"):
        PruneConfig(method="sparsegpt", pattern="structured", structured_unit="qk_dims")
    with pytest.raises(ValueError, match="qk_sparsity"):
        PruneConfig(qk_sparsity=0.5)
    cfg = PruneConfig(method="wanda", pattern="structured", structured_unit="qk_dims+heads+ffn", targets="qk")
    from pipeline.pruning.config import structured_units

    assert structured_units(cfg) == ("qk_dims",)
    assert structured_units(PruneConfig(pattern="structured", structured_unit="ffn+heads+qk_dims")) == (
        "qk_dims",
        "heads",
        "ffn",
    )
    for family in ("gpt2", "llama"):
        with pytest.raises(ValueError, match=r"BERT family|RoPE|BERT-family"):
            prune_model(
                tiny_model(family),
                PruneConfig(method="wanda", pattern="structured", structured_unit="qk_dims"),
                random_batches(1),
            )


def test_swap_rejects_narrowed_heads():
    from pipeline.kernels.swap import swap_attention_

    model = tiny_model("bert")
    prune_model(
        model, PruneConfig(method="magnitude", pattern="structured", structured_unit="qk_dims", sparsity=0.5), []
    )
    with pytest.raises(ValueError, match="narrowed query/key"):
        swap_attention_(model, kernel="flash")


def test_attention_method_defaults_to_the_sparsegpt_companion():
    """No ``attention:`` options = AttentionMethodConfig() defaults (companion sparsegpt), as the README says."""
    cal = random_batches(2)
    a, b = tiny_model("bert"), tiny_model("bert")
    prune_model(a, PruneConfig(method="attention", targets="attention"), cal)
    prune_model(b, PruneConfig(method="attention", targets="attention", attention={"companion": "sparsegpt"}), cal)
    torch.testing.assert_close(blocks(a)[1].v.weight, blocks(b)[1].v.weight)
    torch.testing.assert_close(blocks(a)[1].o.weight, blocks(b)[1].o.weight)
