"""Bounded-entry attention as a model property (config.json, rebuilt on load) and the YAML ``recover`` stage on
the almost-linear gradient (issue 13 item 3): used where verify_gradient's rule applies, refused otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pipeline
from pipeline.errors import StageError
from pipeline.loaded import ModelLoadError
from tests.pipeline.privacy.synth import corpus_words

CAP = 0.5


def _bounded_gpt2(root, n_positions: int = 600):
    """A tiny GPT-2 (2 layers, 4 heads of dim 4) with bounded-entry attention (cap 0.5), saved as a model folder."""
    from pipeline.lowrank.bounded import bound_attention_
    from pipeline.models import load_model, save_model
    from tests.helpers import make_tiny_model

    src = make_tiny_model(root / "src", "gpt2", n_embd=16, n_head=4, n_positions=n_positions)
    loaded = load_model(src)
    bound_attention_(loaded.model, beta=CAP)
    return save_model(loaded, root / "bounded"), src


def _long_text(path, passages: int, words: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    vocab = corpus_words()
    path.write_text("\n".join(" ".join(rng.choice(vocab, words)) for _ in range(passages)))
    return path


def test_bounded_attention_survives_save_and_load(tmp_path):
    from pipeline.lowrank.bounded import BOUNDED_CONFIG_KEY, bound_attention_, bounded_beta
    from pipeline.models import load_model

    path, src = _bounded_gpt2(tmp_path)
    assert json.loads((path / "config.json").read_text())[BOUNDED_CONFIG_KEY] == {"beta": CAP}
    ids = torch.tensor([[3, 7, 1, 9, 4, 4, 2]])
    direct = load_model(src).model
    bound_attention_(direct, beta=CAP)
    with torch.no_grad():
        loaded = load_model(path).model
        assert bounded_beta(loaded.config) == CAP
        got, want = loaded(input_ids=ids).logits, direct(input_ids=ids).logits
        plain = load_model(src).model(input_ids=ids).logits
    assert torch.equal(got, want)  # the same computation, rebuilt from config.json
    assert (got - plain).abs().max() > 1e-4  # and not the unbounded model's
    # a malformed record is one line naming the file and the key
    for bad in ({"beta": -1.0}, {"beta": "big"}, {"beta": 0.5, "degree": 3}, [0.5]):
        conf = json.loads((path / "config.json").read_text())
        conf[BOUNDED_CONFIG_KEY] = bad
        (path / "config.json").write_text(json.dumps(conf))
        with pytest.raises(ModelLoadError) as ei:
            load_model(path)
        assert f"config.json: {BOUNDED_CONFIG_KEY}" in str(ei.value) and "\n" not in str(ei.value)


def test_yaml_recover_runs_on_the_almost_linear_gradient_and_verify_gradient_certifies_it(tmp_path, monkeypatch):
    """prune -> recover {gradient: almost_linear} -> verify_gradient on a bounded model at 512 tokens: recover's
    student attention runs through the polynomial kernel (counted), the saved model keeps its cap, and
    verify_gradient measures beta <= cap on every head, all applicable, with the fast gradient within 1e-3."""
    from pipeline.lowrank import bounded

    calls = {"n": 0}
    real = bounded.lowrank_attention

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(bounded, "lowrank_attention", counting)
    path, _ = _bounded_gpt2(tmp_path)
    cal = _long_text(tmp_path / "long.txt", 8, 560)
    cfg = {
        "model": {"path": str(path)},
        "targets": ["host-cpu"],
        "calibration": {"file": str(cal), "samples": 4, "heldout": 4, "max_length": 512, "batch_size": 2},
        "stages": [
            {"prune": {"method": "magnitude", "sparsity": 0.3}},
            {"recover": {"steps": 3, "gradient": "almost_linear", "samples": 4, "batch_size": 2, "lr": 1e-3}},
            {"verify_gradient": {"samples": 2, "seq_len": 512, "timing_repeats": 1}},
        ],
    }
    rep = pipeline.run(cfg, workdir=tmp_path / "run", progress=False)
    stages = {s["name"]: s["metrics"] for s in rep["stages"]}
    rec, vg = stages["recover"], stages["verify_gradient"]
    # kernel_eps 1e-4 at cap 0.5: degree 5, C(4 + 5, 5) = 126 features <= 512 / 4
    assert rec["gradient"] == "almost_linear"
    assert rec["almost_linear"] == {"beta": CAP, "degree": 5, "features": 126, "head_dim": 4, "tokens": 512}
    assert calls["n"] >= 3 * 2  # every training step's student forward, in both layers
    md = (tmp_path / "run" / "report.md").read_text()
    assert "attention gradient: almost-linear (polynomial degree 5, 126 features per head of dim 4" in md
    saved = next((tmp_path / "run").glob("stages/*recover/model/config.json"))
    assert json.loads(saved.read_text())["edgepipe_bounded_attention"] == {"beta": CAP}
    assert vg["bounded_beta"] == CAP
    assert all(h["beta"] <= CAP + 1e-9 and h["applicable"] for h in vg["heads"]) and len(vg["heads"]) == 8
    assert vg["kernel_gradients"]["max_rel_err"] <= 1e-4
    assert vg["fast_gradient"]["rel_err"] <= 1e-3 and rep["ok"]


def test_almost_linear_recover_is_refused_where_it_does_not_apply(tiny_models, tmp_path):
    """An unbounded model, and a bounded one whose batches are too short for the features to pay: one line each."""
    path, _ = _bounded_gpt2(tmp_path)
    cal = _long_text(tmp_path / "t.txt", 8, 40)
    for model, needle in (
        (tiny_models["gpt2"], "attention entries are not bounded"),
        (path, "needs degree 5 = 126 features at head dim 4"),
    ):
        cfg = {
            "model": {"path": str(model)},
            "targets": ["host-cpu"],
            "calibration": {"file": str(cal), "samples": 4, "heldout": 4, "max_length": 32},
            "stages": [{"recover": {"steps": 1, "gradient": "almost_linear"}}],
        }
        with pytest.raises(StageError) as ei:
            pipeline.run(cfg, workdir=tmp_path / f"run{needle[:3]}", progress=False)
        assert needle in str(ei.value) and "recover" in str(ei.value) and "\n" not in str(ei.value)
