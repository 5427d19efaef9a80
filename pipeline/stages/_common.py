"""Helpers shared by the built-in stages: text sets, tokenized feeds, model loading from an artifact."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifact import Artifact
from pipeline.errors import ConfigError
from pipeline.stage import StageContext

__all__ = [
    "cap_length",
    "encode",
    "load_dense",
    "load_from_artifact",
    "model_max_positions",
    "model_path",
    "stage_warning",
    "text_sets",
    "text_sets_and_rest",
    "to_numpy_feeds",
    "warn_without_validate",
    "write_target_bundle",
]


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


def model_max_positions(model: Any) -> int | None:
    """The longest sequence ``model`` can take, in tokens, or ``None`` when it has no limit we know of.

    Read from the modules where positions are a table: a learned ``position_embeddings``/``wpe``
    ``nn.Embedding`` has ``num_embeddings`` rows, less ``padding_idx + 1`` where the embeddings count
    positions from after the pad id (RoBERTa, XLM-R, MPNet: 514 rows -> 512 tokens). Rotary models
    (Llama family) have no table; their ``config.max_position_embeddings`` (the trained context) is used.
    """
    import torch

    for mod in model.modules():
        for attr in ("position_embeddings", "wpe"):
            emb = getattr(mod, attr, None)
            if isinstance(emb, torch.nn.Embedding):
                pad = getattr(mod, "padding_idx", None)  # RobertaEmbeddings / MPNetEmbeddings offset positions by it
                return int(emb.num_embeddings) - (int(pad) + 1 if isinstance(pad, int) else 0)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def cap_length(loaded: Any, requested: int, setting: str, ctx: StageContext | None, *, reserve: int = 0) -> int:
    """``requested`` tokens (plus ``reserve`` more that the stage appends), capped at the model's limit.

    A cap is logged and recorded as a note in the stage's metrics (``notes``, shown in report.md) naming
    both numbers, so a run never feeds a position the model has no embedding for.

    Args:
        loaded: the :class:`~pipeline.models.LoadedModel`.
        requested: the setting's value in tokens.
        setting: its name for the note (e.g. ``"calibration.max_length"``).
        ctx: the running stage (``None``: cap silently).
        reserve: tokens the caller adds after these (e.g. generated tokens after a prompt).

    Returns:
        ``min(requested, limit - reserve)`` (at least 1).
    """
    limit = model_max_positions(loaded.model)
    if limit is None or requested + reserve <= limit:
        return requested
    capped = max(1, limit - reserve)
    extra = f" less {reserve} reserved" if reserve else ""
    note = f"{setting} {requested} capped at {capped}: the model takes at most {limit} positions{extra}"
    if ctx is not None:
        ctx.log.warning(note)
        notes = ctx.metrics.setdefault("notes", [])
        if note not in notes:
            notes.append(note)
    return capped


def progress_bar(ctx: StageContext, iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar for a stage (``leave=False``): off with ``--quiet`` (``ctx.progress`` False), and off when stderr
    is not a terminal (tqdm's ``disable=None``), so CI logs get no redrawn bar lines."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if ctx.progress else True, leave=False, **kwargs)


def stage_warning(ctx: StageContext, message: str) -> None:
    """Log a warning and record it in the stage's metrics (``warnings``, shown in report.md)."""
    ctx.log.warning(message)
    warnings = ctx.metrics.setdefault("warnings", [])
    if message not in warnings:
        warnings.append(message)


def warn_without_validate(ctx: StageContext, stage: str) -> None:
    """Compression without a later ``validate`` stage is unchecked: say so (a broken model would ship silently)."""
    later = [s.kind for s in list(ctx.run.stages)[ctx.index + 1 :]]
    if "validate" not in later:
        stage_warning(
            ctx,
            f"{stage} changes the model's numbers but no validate stage follows: nothing checks the result's"
            " fidelity against the dense model; add '- validate: {}' after it",
        )


def model_input_names(model: Any) -> frozenset[str]:
    """The keyword inputs ``model.forward`` accepts (DistilBERT/MPNet take no ``token_type_ids``)."""
    import inspect

    return frozenset(inspect.signature(model.forward).parameters)


def encode(
    loaded: Any,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    ctx: StageContext | None = None,
    setting: str = "calibration.max_length",
) -> list[dict[str, Any]]:
    """Tokenized, padded torch batches (``input_ids``, ``attention_mask`` [, ``token_type_ids``]).

    ``max_length`` is capped at the model's position limit (:func:`cap_length`, noted under ``setting``);
    only the inputs ``loaded.model.forward`` accepts are kept (a DistilBERT folder shipped with a BERT
    tokenizer gets no ``token_type_ids``).

    Raises:
        ConfigError: the tokenizer produced an id the model's embedding table has no row for.
    """
    from pipeline.data import tokenize_batches

    vocab = getattr(loaded.model.config, "vocab_size", None)
    max_length = cap_length(loaded, max_length, setting, ctx)
    batches = tokenize_batches(
        loaded.tokenizer, list(texts), batch_size=batch_size, max_length=max_length, vocab_size=vocab
    )
    rows = _embedding_rows(loaded.model)
    top = max(int(b["input_ids"].max()) for b in batches)
    if rows is not None and top >= rows:
        size = len(loaded.tokenizer) if loaded.tokenizer is not None else "?"
        raise ConfigError(
            f"model {getattr(loaded, 'path', '')}: the tokenizer ({size} tokens) produced id {top} but the model's"
            f" input embedding has {rows} rows (config vocab_size {vocab}); tokenizer and model do not belong together"
        )
    accepted = model_input_names(loaded.model)
    return [{k: v for k, v in b.items() if k in accepted} for b in batches]


def _embedding_rows(model: Any) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else None


def to_numpy_feeds(batch: Mapping[str, Any], io: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """ONNX feeds for an exported model from a tokenized batch: only declared inputs, int64, empty KV past.

    ``io`` is the exporter's record (input names, layers, kv heads, head dim, with_past).
    """
    names = list(io.get("input_names", ()))
    ids = np.asarray(
        batch["input_ids"].numpy() if hasattr(batch["input_ids"], "numpy") else batch["input_ids"], dtype=np.int64
    )
    mask = np.asarray(
        batch["attention_mask"].numpy() if hasattr(batch["attention_mask"], "numpy") else batch["attention_mask"],
        dtype=np.int64,
    )
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


def write_target_bundle(
    ctx: StageContext,
    out_dir: Path,
    prof: Any,
    tm: Any,
    feeds: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    threads: int,
    runs: int = 20,
    warmup: int = 3,
) -> Path:
    """The standalone evaluation bundle for one target: its shipped model (``.ort`` where the profile asks for
    ORT format), sample inputs, PyTorch reference of the first output and the profile's tolerance; inputs padded
    to the profile's ``static_shapes`` where it sets them."""
    from runtimes.bundle import write_bundle

    first = tm.io["output_names"][0]
    tol = prof.tolerances[tm.precision]
    model = ctx.resolve(tm.files["ort"]) if "ort" in tm.files else ctx.resolve(tm.model)
    return write_bundle(
        out_dir,
        model_path=model,
        sample_inputs=dict(feeds),
        reference_outputs={first: reference[first]},
        atol=tol.atol,
        rtol=0.0,
        min_cosine=tol.min_cosine,
        threads=threads,
        providers=prof.providers,
        runs=runs,
        warmup=warmup,
        static_shape=(prof.static_shapes.batch, prof.static_shapes.seq) if prof.static_shapes else None,
    )
