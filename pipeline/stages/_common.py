"""Helpers shared by the built-in stages: text sets, tokenized feeds, model loading from an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.artifact import Artifact
from pipeline.errors import ConfigError
from pipeline.stage import StageContext

__all__ = ["text_sets", "text_sets_and_rest", "load_from_artifact", "load_dense", "encode", "to_numpy_feeds", "model_path", "write_target_bundle"]


def text_sets(ctx: StageContext) -> tuple[list[str], list[str]]:
    """(calibration, held-out) passages: disjoint, deterministic, from ``calibration.file`` or the built-in text."""
    calib, heldout, _ = text_sets_and_rest(ctx)
    return calib, heldout


def text_sets_and_rest(ctx: StageContext) -> tuple[list[str], list[str], list[str]]:
    """:func:`text_sets` plus the passages after the held-out window (e.g. more training text for ``recover``)."""
    from pipeline.data import load_texts

    c = ctx.run.calibration
    texts = load_texts(Path(c.file) if c.file else None)
    need = c.samples + c.heldout
    if len(texts) < need:
        where = c.file or "the built-in calibration text"
        raise ConfigError(
            f"calibration: {where} has {len(texts)} passages but samples ({c.samples}) + heldout ({c.heldout}) = {need} are needed"
        )
    return texts[: c.samples], texts[c.samples : need], texts[need:]


def model_path(art: Artifact, ctx: StageContext) -> Path:
    p = Path(art.model_dir)
    return p if p.is_absolute() else ctx.resolve(art.model_dir)


def load_from_artifact(art: Artifact, ctx: StageContext, *, reference: bool = False):
    """The current PyTorch model. ``reference=True``: with a recorded block-sparse attention swap re-applied
    through the dense masked oracle kernel, so it computes what the exported block-sparse graph computes."""
    from pipeline.models import load_model

    loaded = load_model(model_path(art, ctx), art.task)
    record = art.torch_changes.get("attention")
    if reference and record:
        from pipeline.kernels.change import AttentionChange, apply_attention_change

        change = AttentionChange.from_record(record)
        if change.block_sparse:
            apply_attention_change(loaded.model, change, kernel="naive")
    private = art.torch_changes.get("private_context")
    if private:  # the decoder attends to its private prefix through the DP release only
        from pipeline.privacy.model import DPPrefix, apply_dp_prefix_

        apply_dp_prefix_(loaded.model, DPPrefix.load(ctx.resolve(private["release"])))
    return loaded


def load_dense(art: Artifact):
    from pipeline.models import load_model

    return load_model(Path(art.dense_dir), art.task)


def encode(loaded: Any, texts: Sequence[str], *, max_length: int, batch_size: int) -> list[dict[str, Any]]:
    """Tokenized, padded torch batches (``input_ids``, ``attention_mask`` [, ``token_type_ids``])."""
    from pipeline.data import tokenize_batches

    vocab = getattr(loaded.model.config, "vocab_size", None)
    return tokenize_batches(loaded.tokenizer, list(texts), batch_size=batch_size, max_length=max_length, vocab_size=vocab)


def to_numpy_feeds(batch: Mapping[str, Any], io: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ONNX feeds for an exported model from a tokenized batch: only declared inputs, int64, empty KV past.

    ``io`` is the exporter's record (input names, layers, kv heads, head dim, with_past).
    """
    names = list(io.get("input_names", ()))
    ids = np.asarray(batch["input_ids"].numpy() if hasattr(batch["input_ids"], "numpy") else batch["input_ids"], dtype=np.int64)
    mask = np.asarray(batch["attention_mask"].numpy() if hasattr(batch["attention_mask"], "numpy") else batch["attention_mask"], dtype=np.int64)
    b = ids.shape[0]
    feeds: dict[str, np.ndarray] = {}
    for name in names:
        if name == "input_ids":
            feeds[name] = ids
        elif name == "attention_mask":
            feeds[name] = mask
        elif name == "token_type_ids":
            tt = batch.get("token_type_ids")
            feeds[name] = np.asarray(tt.numpy() if tt is not None else np.zeros_like(ids), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        elif name.startswith("past_key_values."):
            # (B, kv_heads, past_len=0, head_dim): the first step of generation has an empty cache
            feeds[name] = np.zeros((b, int(io["num_kv_heads"]), 0, int(io["head_dim"])), dtype=np.float32)
        else:
            raise ConfigError(f"exported model has an input '{name}' edgepipe does not know how to feed")
    return feeds


def write_target_bundle(ctx: StageContext, out_dir: Path, prof: Any, tm: Any, feeds: Mapping[str, np.ndarray],
                        reference: Mapping[str, np.ndarray], *, threads: int, runs: int = 20, warmup: int = 3) -> Path:
    """The standalone evaluation bundle for one target: its shipped model (``.ort`` where the profile asks for
    ORT format), sample inputs, PyTorch reference of the first output and the profile's tolerance."""
    from runtimes.bundle import write_bundle

    first = tm.io["output_names"][0]
    tol = prof.tolerances[tm.precision]
    model = ctx.resolve(tm.files["ort"]) if "ort" in tm.files else ctx.resolve(tm.model)
    return write_bundle(out_dir, model_path=model, sample_inputs=dict(feeds), reference_outputs={first: reference[first]},
                        atol=tol.atol, rtol=0.0, min_cosine=tol.min_cosine, threads=threads, providers=prof.providers,
                        runs=runs, warmup=warmup)
