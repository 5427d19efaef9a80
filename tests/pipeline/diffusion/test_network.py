"""The score network's folder format, its loading through pipeline.models, and refusal of bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.diffusion.network import MODEL_TYPE, ScoreMLP, ScoreModelConfig
from pipeline.models import ModelLoadError, infer_task, load_model, model_family, save_model


def test_round_trip_through_pipeline_models(tiny_score_model, tmp_path):
    loaded = load_model(tiny_score_model)
    assert (loaded.task, loaded.family, loaded.model_type, loaded.tokenizer) == (
        "score-model",
        "score-model",
        MODEL_TYPE,
        None,
    )
    conf = json.loads((tiny_score_model / "config.json").read_text())
    ns = type("C", (), conf)
    assert model_family(ns) == "score-model" and infer_task(ns) == "score-model"
    out = save_model(loaded, tmp_path / "copy")
    again = load_model(out, "score-model")
    x, t = torch.randn(7, 2), torch.rand(7) + 0.01
    assert torch.equal(loaded.model(x, t), again.model(x, t))
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(tiny_score_model, "fill-mask")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_bad_folders(tiny_score_model, tmp_path):
    pickled = _copy(tiny_score_model, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(pickled)

    wrong = _copy(tiny_score_model, tmp_path / "wrong")
    conf = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**conf, "hidden": 33}))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(wrong)

    bad = _copy(tiny_score_model, tmp_path / "bad-config")
    (bad / "config.json").write_text(json.dumps({**conf, "t_min": -1}))
    with pytest.raises(ModelLoadError, match="t_min"):
        load_model(bad)

    badmix = _copy(tiny_score_model, tmp_path / "bad-mixture")
    (badmix / "config.json").write_text(
        json.dumps({**conf, "data_distribution": {"weights": [0.5, 0.6], "means": [[0, 0], [1, 1]], "stds": [1, 1]}})
    )
    with pytest.raises(ModelLoadError, match="data_distribution"):
        load_model(badmix)

    from safetensors.torch import load_file, save_file

    nan = _copy(tiny_score_model, tmp_path / "nan")
    w = load_file(str(nan / "model.safetensors"))
    w["net.0.weight"][0, 0] = float("nan")
    save_file(w, str(nan / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="non-finite"):
        load_model(nan)

    garbage = _copy(tiny_score_model, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(garbage)


def test_score_is_minus_eps_over_sigma():
    model = ScoreMLP(ScoreModelConfig(dim=3, hidden=8, layers=1))
    x, t = torch.randn(5, 3), torch.tensor([1e-3, 0.1, 1.0, 3.0, 8.0])
    sigma = torch.sqrt(-torch.expm1(-2 * t))
    assert torch.allclose(model(x, t), -model.eps(x, t) / sigma[:, None])


def test_prune_linears(tiny_score_model):
    from pipeline.diffusion.evaluate import prune_linears_, score_inputs
    from pipeline.diffusion.network import load_score_model

    model = load_score_model(tiny_score_model)
    rep = prune_linears_(model, method="magnitude", sparsity=0.5)["sparsity"]
    assert rep["overall"] == pytest.approx(0.5, abs=0.01)
    model = load_score_model(tiny_score_model)
    calib = score_inputs(model, 256, seed=0)
    prune_linears_(model, method="wanda", sparsity=0.0, n=2, m=4, calibration=calib)
    w = model.net[2].weight  # (16, 16): at most 2 nonzeros in every group of 4 inputs
    assert int((w.reshape(16, -1, 4) != 0).sum(-1).max()) <= 2
    with pytest.raises(ValueError, match="calibration"):
        prune_linears_(model, method="wanda", sparsity=0.5)
    with pytest.raises(ValueError, match="method"):
        prune_linears_(model, method="sparsegpt", sparsity=0.5)


def test_prune_linears_takes_every_registered_method_it_can_feed(tiny_score_model):
    """The allowed methods come from the pruning registry: a new per-matrix method reading input norms (the toy
    method) is taken with no change here; one needing the Hessian (sparsegpt) or no per-matrix rule is not."""
    import importlib
    import sys

    from pipeline.diffusion.evaluate import prune_linears_, score_inputs, score_prune_methods
    from pipeline.diffusion.network import load_score_model
    from pipeline.pruning.registry import PRUNE_METHODS

    assert score_prune_methods() == ["magnitude", "wanda"]
    toy = importlib.import_module("tests.pipeline.pruning.toy_method")
    try:
        toy.CALLS.clear()
        assert "toy_energy" in score_prune_methods()
        model = load_score_model(tiny_score_model)
        shapes = [tuple(mod.weight.shape) for mod in model.modules() if isinstance(mod, torch.nn.Linear)]
        rep = prune_linears_(model, method="toy_energy", sparsity=0.5, calibration=score_inputs(model, 64, seed=0))
        assert toy.CALLS == shapes and rep["sparsity"]["overall"] == pytest.approx(0.5, abs=0.05)
    finally:
        PRUNE_METHODS.pop("toy_energy")
        sys.modules.pop("tests.pipeline.pruning.toy_method")


def test_family_stage_dispatch():
    import pipeline.stages  # noqa: F401
    from pipeline.families import ModelKind, kind_of_family, register_model_kind
    from pipeline.stage import STAGES, stage_for

    assert stage_for("export", "score-model").fn.__name__ == "export_score_model"
    assert stage_for("export", "bert") is STAGES["export"]
    assert stage_for("verify_diffusion", "score-model") is STAGES["verify_diffusion"]
    kind = kind_of_family("score-model")
    assert kind is not None and kind.model_type == MODEL_TYPE
    with pytest.raises(ValueError, match="registered twice"):
        register_model_kind(ModelKind(MODEL_TYPE, "other", ("x",), kind.load, kind.save))
