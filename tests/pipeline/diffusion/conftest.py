"""Score-network folders for the tests: a small untrained one (format tests) and the shipped example (runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLE_MODEL = Path(__file__).resolve().parents[3] / "examples" / "diffusion-gmm" / "score-model"


@pytest.fixture(scope="session")
def tiny_score_model(tmp_path_factory) -> Path:
    """A 2-D, 16-wide score MLP at its seeded initialisation, recording the example mixture (no training)."""
    import torch

    from pipeline.diffusion.bounds import second_moment
    from pipeline.diffusion.network import ScoreMLP, ScoreModelConfig, save_score_model
    from pipeline.diffusion.train import example_mixture

    torch.manual_seed(0)
    gmm = example_mixture()
    conf = ScoreModelConfig(
        dim=2,
        hidden=16,
        layers=2,
        data_second_moment=float(second_moment(gmm)) / 2,
        extra={"data_distribution": {"type": "gaussian-mixture", **gmm.to_dict()}},
    )
    return save_score_model(ScoreMLP(conf), tmp_path_factory.mktemp("score") / "score-model")


@pytest.fixture(scope="session")
def example_score_model() -> Path:
    """The trained network shipped with examples/diffusion-gmm.yaml."""
    assert (EXAMPLE_MODEL / "model.safetensors").is_file(), f"{EXAMPLE_MODEL} is part of the repository"
    return EXAMPLE_MODEL
