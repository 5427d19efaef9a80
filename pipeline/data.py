"""Text -> calibration batches.

Calibration, distillation (``pipeline.recover``) and fidelity checks all need the same thing: a list of
English passages turned into padded ``input_ids``/``attention_mask`` batches. This module provides:

- ``builtin_calibration_texts()``: the product's own calibration/validation passages, shipped as package
  data in ``pipeline/data/calibration.txt`` (one passage per line), so a user needs no dataset download.
- ``load_texts(path)``: a user's text file with the same one-passage-per-line format (or the built-in set).
- ``split_texts(texts, holdout_fraction, seed)``: a deterministic calibration / held-out split.
- ``tokenize_batches(tokenizer, texts, ...)``: padded batches of ``torch.Tensor``; with ``tokenizer=None`` a
  deterministic hash of each word gives ids in ``[1, vocab_size)`` so tiny tokenizer-less test models still
  see the structure of real text (repeated words -> repeated ids) instead of uniform noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

import hashlib
import importlib.resources
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "builtin_calibration_texts",
    "hash_token_ids",
    "load_texts",
    "read_text_file",
    "split_texts",
    "tokenize_batches",
]

logger = logging.getLogger(__name__)

_BUILTIN_RESOURCE = "data/calibration.txt"
# Words and single punctuation marks: "Don't stop." -> ["Don", "'", "t", "stop", "."]
_WORD_RE = re.compile(r"\w+|[^\w\s]")
# Id 0 is reserved for padding in the hash tokenizer; word ids are drawn from [1, vocab_size).
_HASH_PAD_ID = 0


def _read_passages(text: str) -> list[str]:
    """One passage per line; surrounding whitespace stripped, blank lines skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


MAX_TEXT_BYTES = 256 << 20  # a calibration file is text for a few hundred passages; this bounds memory


def read_text_file(path: Path | str) -> str:
    """A user's text file as ``str``: a regular, readable, UTF-8 file without NUL bytes, at most
    :data:`MAX_TEXT_BYTES`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a directory or other non-regular file, unreadable, too large, binary or not UTF-8 (the
            message names the file and, for bad bytes, their offset).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"text file not found: '{p}'")
    if not p.is_file():
        raise ValueError(f"'{p}' is {'a directory' if p.is_dir() else 'not a regular file'}, not a text file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"'{p}' cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_TEXT_BYTES:
        raise ValueError(f"'{p}' is larger than {MAX_TEXT_BYTES >> 20} MiB")
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(f"'{p}' is binary (NUL byte at offset {nul}), not one passage per line of text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"'{p}' is not UTF-8 text (invalid byte at offset {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def builtin_calibration_texts() -> list[str]:
    """Return the built-in calibration passages shipped with the package.

    The file is package data (``pipeline/data/calibration.txt``, ~170 varied English passages of 10-60 words
    written for this project), so it is available wherever ``pipeline`` is installed.

    Returns:
        The passages in file order.
    """
    resource = importlib.resources.files("pipeline").joinpath(_BUILTIN_RESOURCE)
    texts = _read_passages(resource.read_text(encoding="utf-8"))
    if not texts:  # internal invariant: the shipped file is never empty
        raise RuntimeError(f"built-in calibration file {resource!s} is empty")
    return texts


def load_texts(path: Path | str | None, *, limit: int | None = None, offset: int = 0) -> list[str]:
    """Load passages from a text file (one per line, blank lines skipped) or the built-in set.

    Args:
        path: a UTF-8 text file with one passage per line; ``None`` selects ``builtin_calibration_texts()``.
        limit: keep at most this many passages (after ``offset``); ``None`` keeps all.
        offset: skip this many passages first (e.g. to take a disjoint evaluation window).

    Returns:
        The selected passages, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names the file).
        ValueError: ``path`` is not a readable UTF-8 text file (:func:`read_text_file`), has no non-blank line, ``offset``/``limit`` are negative, or the selection is
            empty.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit!r}")
    if path is None:
        texts = builtin_calibration_texts()
        source = "built-in calibration set"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"text file not found: '{p}'")
        texts = _read_passages(read_text_file(p))
        source = f"'{p}'"
        if not texts:
            raise ValueError(f"text file {source} has no non-blank lines")
    end = None if limit is None else offset + limit
    selected = texts[offset:end]
    if not selected:
        raise ValueError(f"offset={offset} skips all {len(texts)} passages of {source}")
    logger.debug("loaded %d passages from %s (offset=%d, limit=%s)", len(selected), source, offset, limit)
    return selected


def split_texts(texts: Sequence[str], holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split passages into (train, holdout) deterministically.

    A seeded permutation picks ``round(len(texts) * holdout_fraction)`` held-out passages (at least one when
    the fraction is positive); both parts keep the input order, so the split depends only on
    ``(len(texts), holdout_fraction, seed)``.

    Args:
        texts: the passages.
        holdout_fraction: fraction held out, in ``[0, 1)``.
        seed: seed of the permutation.

    Returns:
        ``(train, holdout)``; ``train`` is never empty.

    Raises:
        ValueError: the fraction is outside ``[0, 1)`` or leaves no training passage.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    n = len(texts)
    n_hold = round(n * holdout_fraction)
    if holdout_fraction > 0 and n_hold == 0:
        n_hold = 1
    if n - n_hold < 1:
        raise ValueError(f"holdout_fraction={holdout_fraction} of {n} passages leaves no training passage")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_hold])
    train = [t for i, t in enumerate(texts) if i not in held]
    holdout = [t for i, t in enumerate(texts) if i in held]
    return train, holdout


def hash_token_ids(text: str, vocab_size: int) -> list[int]:
    """Deterministic word-level ids in ``[1, vocab_size)`` (0 is padding), stable across processes.

    Uses blake2b rather than ``hash()`` because Python salts string hashes per process.

    Args:
        text: one passage.
        vocab_size: size of the model's embedding table (>= 2).

    Returns:
        One id per word or punctuation mark.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 for hash tokenization, got {vocab_size!r}")
    ids = []
    for word in _WORD_RE.findall(text):
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        ids.append(1 + int.from_bytes(digest, "little") % (vocab_size - 1))
    return ids


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # lazily: reading texts (e.g. for a cached run's fingerprint) must not pay torch's import

    """Right-pad id lists to one length -> ``(ids, mask)``, both (B, T) int64."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _tokenizer_pad_id(tokenizer: Any) -> int:
    """Pad id of a HF tokenizer; GPT-2 style tokenizers have none, and since padded positions are masked out
    any valid id works, so fall back to eos, then 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def tokenize_batches(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    vocab_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Turn passages into right-padded batches.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(list_of_str, truncation=True,
            max_length=...)``), or ``None`` for the deterministic hash tokenizer (``hash_token_ids``).
        texts: the passages, batched in order; the last batch may be smaller.
        batch_size: passages per batch (>= 1).
        max_length: truncate each passage to this many tokens (>= 1).
        vocab_size: required when ``tokenizer`` is ``None``: ids are drawn from ``[1, vocab_size)``.

    Returns:
        A list of dicts with ``input_ids`` and ``attention_mask`` (both (B, T) int64, 1 = real token), plus
        ``token_type_ids`` when the tokenizer returns them.

    Raises:
        ValueError: bad ``batch_size``/``max_length``, no texts, or ``tokenizer`` and ``vocab_size`` both None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length!r}")
    if not texts:
        raise ValueError("texts is empty: nothing to tokenize")
    if tokenizer is None and vocab_size is None:
        raise ValueError("tokenizer=None needs vocab_size for hash-based ids")

    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        if tokenizer is None:
            assert vocab_size is not None
            rows = [hash_token_ids(t, vocab_size)[:max_length] or [1] for t in chunk]
            ids, mask = _pad(rows, _HASH_PAD_ID)
            batches.append({"input_ids": ids, "attention_mask": mask})
            continue
        # Pad ourselves: tokenizers without a pad token (GPT-2) would refuse padding=True.
        enc = tokenizer(chunk, truncation=True, max_length=max_length)
        rows = [list(r) or [_tokenizer_pad_id(tokenizer)] for r in enc["input_ids"]]
        ids, mask = _pad(rows, _tokenizer_pad_id(tokenizer))
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in enc:
            tt, _ = _pad([list(r) or [0] for r in enc["token_type_ids"]], 0)
            batch["token_type_ids"] = tt
        batches.append(batch)
    return batches
