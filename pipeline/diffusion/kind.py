"""The GMM score network as an edgepipe model kind (registered by :mod:`pipeline.families`): ``model_type``
``edgepipe-score-mlp`` → family and task ``score-model``, loaded and saved by :mod:`pipeline.diffusion.network`."""

from __future__ import annotations

from pathlib import Path

from pipeline.diffusion.network import (
    FAMILY,
    MODEL_TYPE,
    TASK,
    ScoreModelError,
    load_score_model,
    mixture_of,
    save_score_model,
)
from pipeline.loaded import LoadedModel, ModelKind, ModelLoadError, check_weights

__all__ = ["SCORE_MODEL_KIND"]


def _load(path: Path, task: str | None):
    if task not in (None, TASK):
        raise ModelLoadError(f"{path}: task {task!r} is not supported for {MODEL_TYPE!r} (supports {TASK!r})")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    check_weights(path)  # refuses pickle-only folders with the usual message
    try:
        model = load_score_model(path)
        mixture_of(model.config)  # a recorded data_distribution must be a valid mixture
    except ScoreModelError as exc:
        raise ModelLoadError(str(exc)) from None
    return LoadedModel(model=model, tokenizer=None, task=TASK, family=FAMILY, model_type=MODEL_TYPE, path=path)


def _save(loaded, out: Path) -> Path:
    return save_score_model(loaded.model, out)


SCORE_MODEL_KIND = ModelKind(model_type=MODEL_TYPE, family=FAMILY, tasks=(TASK,), load=_load, save=_save)
