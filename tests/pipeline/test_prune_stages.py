"""prune and recover as pipeline stages: YAML/API, target-aware pattern checks, physical shrinking, recovery."""

from __future__ import annotations

import json

import pytest

import pipeline
from pipeline.errors import ConfigError
from pipeline.stages.prune import PatternGivesNoSpeedup

pytestmark = pytest.mark.slow

CAL = {"samples": 8, "heldout": 8, "max_length": 24}


def _cfg(model, stages, targets=("host-cpu",)):
    return {"model": {"path": str(model)}, "targets": list(targets), "calibration": CAL, "stages": stages}


def test_unstructured_on_cpu_targets_warns_and_strict_fails(tiny_models, tmp_path):
    with pytest.raises(
        ConfigError, match=r"stages\[0\].prune: pattern 'unstructured' gives no speedup on target"
    ):  # before anything runs
        pipeline.run(
            _cfg(tiny_models["bert"], [{"prune": {"method": "magnitude", "sparsity": 0.5, "strict": True}}]),
            workdir=tmp_path / "a",
            progress=False,
        )
    with pytest.warns(PatternGivesNoSpeedup):
        rep = pipeline.run(
            _cfg(tiny_models["bert"], [{"prune": {"method": "magnitude", "sparsity": 0.5}}]),
            workdir=tmp_path / "b",
            progress=False,
        )
    m = rep["stages"][0]["metrics"]
    assert m["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01) and "warning" in m
    # 2:4 is a fast pattern on Jetson profiles: no warning there
    rep = pipeline.run(
        _cfg(
            tiny_models["llama"],
            [{"prune": {"method": "wanda", "pattern": "n:m", "n": 2, "m": 4, "strict": True}}],
            targets=("jetson-orin-nano",),
        ),
        workdir=tmp_path / "c",
        progress=False,
    )
    assert rep["stages"][0]["metrics"]["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)


def test_structured_prune_shrinks_the_export_and_recover_helps(tiny_models, tmp_path):
    stages = [
        {"prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "structured", "structured_unit": "heads+ffn"}},
        {"recover": {"steps": 30, "lr": 1e-3}},
        {"export": {}},
        {"validate": {"min_cos_mean": None}},
    ]
    dense = pipeline.run(_cfg(tiny_models["bert"], [{"export": {}}]), workdir=tmp_path / "dense", progress=False)
    rep = pipeline.run(_cfg(tiny_models["bert"], stages), workdir=tmp_path / "pruned", progress=False)
    assert rep["targets"]["host-cpu"]["size_bytes"] < 0.8 * dense["targets"]["host-cpu"]["size_bytes"]
    assert rep["targets"]["host-cpu"]["parity"]["ok"]
    rec = rep["stages"][1]["metrics"]
    assert rec["steps"] == 30
    # the stage's encoder defaults: token-level last-hidden-state MSE + pooled cosine, every block's states at 10
    assert rec["loss"] == "hidden_mse" and rec["layer_weight"] == 10.0
    assert rec["passages"] == 168 - 8  # every built-in passage except the 8 held-out ones
    before, after = rec["heldout_before"]["cos_mean"], rec["heldout_after"]["cos_mean"]
    assert rec["rolled_back"] is (after < before)
    pruned_cfg = json.loads((tmp_path / "pruned" / "stages" / "02-recover" / "model" / "config.json").read_text())
    assert (
        pruned_cfg["intermediate_size"]
        < json.loads((tiny_models["bert"] / "config.json").read_text())["intermediate_size"]
    )


def test_attention_method_from_yaml(tiny_models, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models['gpt2']}}}\ntargets: [host-cpu]\ncalibration: {{samples: 8, heldout: 8, max_length: 24}}\n"
        "stages:\n  - prune: {method: attention, sparsity: 0.5, attention: {refit_steps: 3, mask_steps: 3}}\n  - export: {}\n  - validate: {min_cos_mean: null}\n"
    )
    rep = pipeline.run(cfg, workdir=tmp_path / "w", progress=False)
    m = rep["stages"][0]["metrics"]
    assert m["method"] == "attention" and m["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert m["attention_error"]["mean"] is not None and rep["targets"]["host-cpu"]["parity"]["ok"]


def test_qk_width_pruning_from_yaml_survives_recover_export_and_validate(tiny_models, tmp_path):
    """The narrowed q/k modules are saved, reloaded by every later stage (recover, export) and exported faithfully."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models['bert']}}}\ntargets: [host-cpu]\ncalibration: {{samples: 8, heldout: 8, max_length: 24}}\n"
        "stages:\n"
        "  - prune: {method: attention, pattern: structured, structured_unit: qk_dims+ffn, qk_sparsity: 0.5,"
        " ffn_sparsity: 0.25, attention: {refit_steps: 5}}\n"
        "  - recover: {steps: 5}\n  - export: {}\n  - validate: {min_cos_mean: null}\n"
    )
    rep = pipeline.run(cfg, workdir=tmp_path / "w", progress=False)
    m = rep["stages"][0]["metrics"]
    widths = [u["qk_width"] for u in m["removed_units"]]
    assert widths and all(w[1] == w[0] // 2 for w in widths) and m["parts"]["qk"] == pytest.approx(0.5)
    assert m["attention_error"]["mean"] is not None  # heads kept: the attention matrices stay comparable
    saved = json.loads((tmp_path / "w" / "stages" / "02-recover" / "model" / "config.json").read_text())
    assert saved["edgepipe_qk_dims"] == {str(i): w[1] for i, w in enumerate(widths)}
    assert rep["targets"]["host-cpu"]["parity"]["ok"]


def test_recover_distils_on_calibration_text_but_never_on_heldout(tmp_path):
    from types import SimpleNamespace

    from pipeline.config import parse_config
    from pipeline.data import load_texts
    from pipeline.stages._common import text_sets
    from pipeline.stages.recover import distillation_texts

    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"passage number {i}" for i in range(50)) + "\n")
    run = parse_config({"calibration": {"file": str(text), "samples": 10, "heldout": 5}})
    ctx = SimpleNamespace(run=run)
    calib, held = text_sets(ctx)
    train, held2 = distillation_texts(ctx, None)
    assert held2 == held
    assert train[:10] == calib and len(train) == 45 and not set(train) & set(held)
    assert train[10] == load_texts(text)[15]  # continues after the held-out window
    assert distillation_texts(ctx, 12)[0] == train[:12]
