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
    assert (loaded.task, loaded.family, loaded.model_type, loaded.tokenizer) == ("score-model", "score-model", MODEL_TYPE, None)
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
