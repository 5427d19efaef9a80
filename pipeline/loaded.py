"""What the loader hands to the rest of the pipeline, and what a model kind must provide: the types shared by
:mod:`pipeline.models` (Hugging Face folders), :mod:`pipeline.families` (the model-kind registry) and the kinds
themselves (e.g. :mod:`pipeline.diffusion.kind`). A leaf module: it imports nothing of edgepipe at load time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TEXT_GENERATION",
    "HFModule",
    "LoadedModel",
    "ModelKind",
    "ModelLoadError",
    "check_weights",
    "is_causal_family",
    "is_causal_lm",
]

# A transformers model or one of its sub-modules, read duck-typed: its attributes (``config``, ``encoder.layer``,
# ``q_proj``, ``get_input_embeddings``, ...) differ per family and are reached through ``nn.Module.__getattr__``,
# which types them as ``Tensor | Module``.
HFModule = Any

# Families whose attention is causal, whatever task they serve.
_DECODER_FAMILIES = frozenset({"gpt2", "llama"})
# The task of a causal LM head: next-token logits (and a KV cache when exported with past).
TEXT_GENERATION = "text-generation"


class ModelLoadError(Exception):
    """A model directory cannot be loaded; the message is one line naming the path."""


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and what the rest of the pipeline needs to know about it.

    Attributes:
        model: the module, eval mode, float32.
        tokenizer: the tokenizer, or ``None`` when the directory has none
            (callers then make token ids directly).
        task: one of :data:`TASKS`.
        family: one of :data:`FAMILIES`.
        model_type: ``config.model_type`` (e.g. ``"qwen2"``).
        path: the directory it was loaded from.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    task: str
    family: str
    model_type: str
    path: Path

    @property
    def config(self) -> Any:
        """``model.config``: the transformers ``PretrainedConfig`` (or the model kind's own config object)."""
        return getattr(self.model, "config", None)

    @property
    def is_decoder(self) -> bool:
        """True for causal decoders (gpt2/llama families), whatever task they serve: the attention is causal."""
        return is_causal_family(self.family)

    @property
    def is_causal_lm(self) -> bool:
        """True for a causal decoder loaded with its LM head (task ``text-generation``): next-token logits, a KV
        cache in the export, perplexity in validation, greedy generation."""
        return is_causal_lm(self.family, self.task)


def is_causal_family(family: str) -> bool:
    """Whether models of ``family`` attend causally (decoders), whatever task they are used for."""
    return family in _DECODER_FAMILIES


def is_causal_lm(family: str, task: str) -> bool:
    """Whether a model of ``family`` serving ``task`` is a causal LM (decoder + LM head): the one place this is
    decided, for a :class:`LoadedModel` (:attr:`LoadedModel.is_causal_lm`) and for artifacts and run plans, which
    carry the same ``family`` and ``task``."""
    return is_causal_family(family) and task == TEXT_GENERATION


def check_weights(path: Path) -> None:
    """Refuse folders that would make transformers run their code (``auto_map``) or read anything but
    ``*.safetensors`` inside the folder (the index is read here first), naming what was found instead."""
    from pipeline.model_folder import ModelFolderError, refuse_remote_code, safetensors_shards

    try:
        refuse_remote_code(path)
        safetensors_shards(path)
    except ModelFolderError as e:
        raise ModelLoadError(str(e)) from None


@dataclass(frozen=True)
class ModelKind:
    """One non-transformers model kind.

    Args:
        model_type: the ``config.json`` ``model_type`` that selects it.
        family: the artifact family (keys family-specific stage implementations).
        tasks: tasks it serves; the first is the one inferred.
        load: ``(folder, task or None) -> LoadedModel``; raises ``pipeline.models.ModelLoadError`` (one line).
        save: ``(LoadedModel, folder) -> folder``, writing a folder ``load`` reads back.
    """

    model_type: str
    family: str
    tasks: tuple[str, ...]
    load: Callable[[Path, str | None], LoadedModel]
    save: Callable[[LoadedModel, Path], Path]
