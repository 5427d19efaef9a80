"""Depth pruning (structured unit ``layers``): block choice against a float64 oracle, config record, recover with
a layer map, and the whole pipeline (prune -> recover -> export -> validate) on tiny BERT / GPT-2 / Llama."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.pruning.adapters import blocks
from pipeline.pruning.api import prune_model
from pipeline.pruning.config import PruneConfig
from pipeline.pruning.depth import LAYER_MAP_KEY, keep_layers_, layer_map, layers_to_drop
from pipeline.recover import _layers_loss, recover_
from tests.pipeline.pruning.conftest import FAMILIES, tiny_model


def _three_blocks(kind: str, seed: int = 0) -> torch.nn.Module:
    base = tiny_model(kind, seed)
    conf = base.config
    conf.num_hidden_layers = 3
    torch.manual_seed(seed)
    return type(base)(conf).eval()


def _batches(seed: int = 0, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 90, (3, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 8:] = 0  # one padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _oracle_sensitivity(model: torch.nn.Module, batches, skip: int) -> float:
    """float64 reference: block ``skip`` replaced by the identity through a forward hook on the full model."""
    m = type(model)(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    base = m.base_model

    def run(hook_on: int | None) -> list[torch.Tensor]:
        handle = None
        if hook_on is not None:
            layer = blocks(m)[hook_on].layer

            def identity(_mod, args, kwargs, out):
                h = args[0] if args else kwargs["hidden_states"]
                return (h, *out[1:]) if isinstance(out, tuple) else h

            handle = layer.register_forward_hook(identity, with_kwargs=True)
        try:
            with torch.no_grad():
                return [
                    base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
                    for b in batches
                ]
        finally:
            if handle is not None:
                handle.remove()

    ref, got = run(None), run(skip)
    num = sum(float((((g - r) ** 2) * b["attention_mask"][..., None]).sum()) for g, r, b in zip(got, ref, batches))
    den = sum(float(((r**2) * b["attention_mask"][..., None]).sum()) for r, b in zip(ref, batches))
    return num / den


@pytest.mark.parametrize("kind", FAMILIES)
def test_sensitivity_matches_the_float64_oracle_and_greedy_drops_the_least_sensitive(kind):
    model = _three_blocks(kind)
    batches = _batches()
    dropped, rounds = layers_to_drop(model, batches, 1, "sensitivity")
    oracle = {c: _oracle_sensitivity(model, batches, c) for c in range(3)}
    got = {int(c): s for c, s in rounds[0]["scores"].items()}
    for c in range(3):
        assert got[c] == pytest.approx(oracle[c], rel=1e-3, abs=1e-9)
    assert dropped == [min(oracle, key=oracle.get)]
    assert len(blocks(model)) == 3  # choosing does not change the model


@pytest.mark.parametrize("kind", FAMILIES)
def test_keep_layers_matches_skipping_and_records_the_map(kind):
    model = _three_blocks(kind)
    batches = _batches()
    base = model.base_model
    with torch.no_grad():
        full = [base(**b).last_hidden_state for b in batches]
    keep_layers_(model, [0, 2])
    assert model.config.num_hidden_layers == 2 and getattr(model.config, LAYER_MAP_KEY) == [0, 2]
    assert len(blocks(model)) == 2 and layer_map(model) == [0, 2]
    keep_layers_(model, [1])  # a second cut composes: the map still names original blocks
    assert layer_map(model) == [2]
    with torch.no_grad():
        out = [model.base_model(**b).last_hidden_state for b in batches]
    assert all(o.shape == f.shape for o, f in zip(out, full))
    with pytest.raises(ValueError, match="increasing indices"):
        keep_layers_(model, [])


def test_prune_model_layers_plus_ffn_reports_what_went():
    model = _three_blocks("bert")
    cfg = PruneConfig(
        method="wanda", pattern="structured", structured_unit="layers+ffn", layer_sparsity=0.34, ffn_sparsity=0.25
    )
    res = prune_model(model, cfg, _batches(), eval_batches=_batches(1))
    m = res.metrics
    assert m["layers"]["blocks"] == [3, 2] and len(m["layers"]["dropped"]) == 1
    assert m["layers"]["layer_map"] == layer_map(model)
    assert m["parts"]["qk"] == pytest.approx(1 / 3)  # one of three blocks' attention gone, widths kept
    assert m["parts"]["ffn"] > 1 / 3 and len(m["removed_units"]) == 2
    assert 0 < m["output_error"] < 10 and "attention_error" not in m


def test_config_checks():
    with pytest.raises(ValueError, match="removes nothing"):
        PruneConfig(pattern="structured", structured_unit="layers", targets="ffn")
    with pytest.raises(ValueError, match="structured' only"):
        PruneConfig(pattern="unstructured", layer_sparsity=0.3)
    assert (
        PruneConfig(method="attention", pattern="structured", structured_unit="layers").layer_criterion == "sensitivity"
    )
    model = _three_blocks("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        keep_layers_(model, [0, 1])


def test_layer_map_pairs_student_blocks_with_their_teacher_blocks():
    teacher = _three_blocks("bert")
    student = _three_blocks("bert")
    keep_layers_(student, [0, 1])  # the last block dropped: student blocks 0, 1 ARE teacher blocks 0, 1
    b = _batches()[0]
    with torch.no_grad():
        t = teacher(**b, output_hidden_states=True).hidden_states[1:-1]
        s = student(**b, output_hidden_states=True).hidden_states[1:-1]
    mask = b["attention_mask"].float()
    assert float(_layers_loss(s, t, mask, [0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert float(_layers_loss(s, t, mask, [1, 2])) > 1e-3  # a wrong pairing is not free
    with pytest.raises(ValueError, match="equal depth or a layer map"):
        _layers_loss(s, t, mask)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_recover_with_layer_map_reduces_the_loss(kind):
    teacher = _three_blocks(kind)
    student = _three_blocks(kind)
    keep_layers_(student, [0, 2])
    res = recover_(
        student,
        teacher,
        _batches(n=3),
        steps=25,
        lr=3e-3,
        layer_weight=3.0,
        layer_map=[0, 2],
        attention_weight=1.0 if kind == "bert" else 0.0,
        heldout=_batches(5, 1),
    )
    assert res.loss_last < 0.8 * res.loss_first
    if kind == "bert":
        assert res.heldout_after["cos_mean"] > res.heldout_before["cos_mean"]
    else:
        assert res.heldout_after["kl"] < res.heldout_before["kl"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILIES)
def test_layers_from_yaml_through_recover_export_and_validate(kind, tmp_path):
    import pipeline
    from tests.helpers import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", kind, num_hidden_layers=3)
    cfg = {
        "model": {"path": str(folder)},
        "targets": ["host-cpu"],
        "calibration": {"samples": 8, "heldout": 8, "max_length": 24},
        "stages": [
            {
                "prune": {
                    "method": "wanda",
                    "pattern": "structured",
                    "structured_unit": "layers",
                    "layer_sparsity": 0.34,
                }
            },
            {"recover": {"steps": 20, "lr": 1e-3}},
            {"export": {}},
            {"validate": {"min_cos_mean": None}},
        ],
    }
    rep = pipeline.run(cfg, workdir=tmp_path / "w", progress=False)
    pm = rep["stages"][0]["metrics"]
    assert pm["layers"]["blocks"] == [3, 2]
    kept = pm["layers"]["layer_map"]
    saved = json.loads((tmp_path / "w" / "stages" / "02-recover" / "model" / "config.json").read_text())
    n_key = "n_layer" if kind == "gpt2" else "num_hidden_layers"
    assert saved[n_key] == 2 and saved[LAYER_MAP_KEY] == kept
    rm = rep["stages"][1]["metrics"]
    assert rm["layer_map"] == kept  # teacher block of each student block (here the dense model's = original)
    assert rm["steps"] == 20 and rm["loss"] == ("hidden_mse" if kind == "bert" else "kl_logits")
    assert rep["targets"]["host-cpu"]["parity"]["ok"]
