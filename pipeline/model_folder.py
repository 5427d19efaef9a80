"""Checks of an untrusted Hugging Face model folder that need no weights and no transformers import.

A model folder is data, never code: a folder that asks transformers to import its own Python (``auto_map`` in
any config JSON) is refused, weights are read from ``*.safetensors`` files only (an index is read here, and a
shard that is not ``.safetensors`` or lies outside the folder is refused before any unpickler could see it),
and ``config.json`` fields the model is built from must have the right types. Every problem raises
:class:`pipeline.models.ModelLoadError`-compatible ``ValueError`` subclasses with one line naming the file and
the key or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "PICKLE_SUFFIXES",
    "TOKENIZER_FILES",
    "ModelFolderError",
    "check_config_fields",
    "has_tokenizer_files",
    "read_config_json",
    "refuse_remote_code",
    "safetensors_shards",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_MAX_JSON_BYTES = 64 << 20  # the largest config-like JSON we parse (a big index is a few MB)
# JSON files that are vocabularies or weight maps, not configs: transformers never reads auto_map from them
_DATA_JSON = ("tokenizer.json", "vocab.json", "model.safetensors.index.json")
# config.json fields the model is built from: positive integers when present (None allowed where HF allows it)
_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "type_vocab_size",
)
_OPTIONAL_POSITIVE_INT_FIELDS = ("num_key_value_heads", "head_dim", "n_inner", "n_ctx")


class ModelFolderError(ValueError):
    """A model folder is unsafe or malformed; the message is one line naming the file and key or tensor."""


def _load_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_JSON_BYTES + 1)
        if len(raw) > _MAX_JSON_BYTES:
            raise ModelFolderError(f"{path}: larger than {_MAX_JSON_BYTES >> 20} MiB; not a config file")
        return json.loads(raw.decode("utf-8"))
    except ModelFolderError:
        raise
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"{path}: not UTF-8 JSON (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelFolderError(f"{path}: malformed JSON: {first}") from None
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read: {exc.strerror or exc}") from None


def read_config_json(folder: Path) -> dict[str, Any]:
    """``config.json`` of ``folder`` as a dict (one-line error if missing, unreadable or not an object)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no config.json (not a Hugging Face model folder)")
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def refuse_remote_code(folder: Path) -> None:
    """Refuse a folder whose config JSONs carry ``auto_map`` (transformers would import the folder's own Python
    under ``trust_remote_code``; edgepipe never runs code from a model folder)."""
    for path in sorted(Path(folder).glob("*.json")):
        if path.name in _DATA_JSON or not path.is_file():
            continue
        data = _load_json(path)
        if isinstance(data, dict) and "auto_map" in data:
            raise ModelFolderError(
                f"{path}: 'auto_map' asks to run Python code from the model folder; edgepipe never runs code from a"
                " model folder (remove auto_map and use a transformers-native model type)"
            )


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix in PICKLE_SUFFIXES)


def safetensors_shards(folder: Path) -> list[Path]:
    """The safetensors files transformers will read from ``folder``, checked before any loader sees them.

    ``model.safetensors`` if present; otherwise the shards named by ``model.safetensors.index.json``, each of
    which must be a ``*.safetensors`` file inside the folder (a relative name without ``..``).

    Raises:
        ModelFolderError: no safetensors weights ("pickle weights are not loaded" when only pickles are there),
            a malformed index, a shard that is not safetensors, outside the folder, or missing.
    """
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _load_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ModelFolderError(f"{index}: expected an object with a non-empty 'weight_map'")
        shards: dict[str, Path] = {}
        for tensor, shard in wmap.items():
            where = f"{index}: weight_map[{str(tensor)[:80]!r}]"
            if not isinstance(shard, str) or not shard:
                raise ModelFolderError(f"{where}: expected a file name")
            rel = PurePosixPath(shard.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts or "\0" in shard:
                raise ModelFolderError(f"{where}: shard {shard[:120]!r} lies outside the model folder; refused")
            if rel.suffix != ".safetensors":
                raise ModelFolderError(
                    f"{where}: shard {shard[:120]!r} is not a .safetensors file; pickle weights are not loaded"
                )
            shards.setdefault(shard, folder / rel)
        for shard, p in shards.items():
            if not p.is_file():
                raise ModelFolderError(f"{index}: shard {shard[:120]!r} is missing")
        if not single.is_file():
            return list(shards.values())
    if single.is_file():
        return [single]
    pickles = _pickles(folder)
    if pickles:
        raise ModelFolderError(
            f"{folder}: only pickle weights found ({', '.join(pickles[:5])}); refusing to load: pickle weights are not loaded"
            " (edgepipe reads safetensors only: unpickling can run arbitrary code); convert them to model.safetensors"
        )
    raise ModelFolderError(f"{folder}: no weights found (expected model.safetensors or model.safetensors.index.json)")


def check_config_fields(config: dict[str, Any], source: str) -> None:
    """Types of the ``config.json`` fields a model is built from, named on failure (``num_attention_heads:
    "two"``), and the head arithmetic (hidden size divisible by heads, heads by KV heads)."""

    def bad(key: str, what: str) -> ModelFolderError:
        got = config[key]
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        return ModelFolderError(f"{source}: {key}: expected {what}, got {shown[:60]}")

    if not isinstance(config.get("model_type"), str):
        raise ModelFolderError(
            f'{source}: model_type: expected a string such as "bert", got {type(config.get("model_type")).__name__}'
        )
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise bad("architectures", "a list of class names")
    for key in _POSITIVE_INT_FIELDS + _OPTIONAL_POSITIVE_INT_FIELDS:
        if key not in config or (config[key] is None and key in _OPTIONAL_POSITIVE_INT_FIELDS):
            continue
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, "a positive integer")
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise ModelFolderError(
            f"{source}: hidden size {hidden} is not divisible by the number of attention heads {heads}"
        )
    kv = config.get("num_key_value_heads")
    if kv and heads and heads % kv:
        raise ModelFolderError(f"{source}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")


def has_tokenizer_files(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)
