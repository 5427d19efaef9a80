"""Tiny model builders and shared-data helpers used by tests across the project.

Kept dependency-light: only ``torch``, ``transformers`` and ``tokenizers`` (a
transformers dependency) are imported, lazily inside the builders, so importing
this module is cheap.

A tiny model is built from a config (hidden 32-64, 2 layers, 4 heads), seeded,
and saved with safetensors; when ``with_tokenizer`` is true a real, offline
word-level tokenizer built in code is saved beside it, with the config's
``vocab_size`` equal to the tokenizer's vocabulary size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pytest

Family = Literal["bert", "gpt2", "llama"]

# Fixed tiny corpus for the word-level vocabulary (not the shared fortunes file:
# builders must work when it is absent).
_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "a small model runs on an edge device with little memory",
    "we prune heads and export the graph to onnx for the runtime",
    "hello world this is a tiny test of the tokenizer",
    "you have taken yourself too seriously",
    "the faster i go the behinder i get",
    "time flies like an arrow fruit flies like a banana",
    "all models are wrong but some are useful",
)
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_DECODER_SPECIALS = ("<unk>", "<s>", "</s>")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _vocab(specials: tuple[str, ...]) -> dict[str, int]:
    """Specials first, then corpus words and ASCII punctuation in a fixed order."""
    words: list[str] = list(specials)
    for line in _CORPUS:
        for w in _TOKEN_RE.findall(line):
            if w not in words:
                words.append(w)
    for ch in ".,;:!?'\"-()":
        if ch not in words:
            words.append(ch)
    return {w: i for i, w in enumerate(words)}


def _make_tokenizer(family: Family) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` that works fully offline.

    Args:
        family: ``"bert"`` gets [CLS]/[SEP]/[PAD]/[MASK] and a CLS..SEP template;
            decoders get ``<s>``/``</s>``/``<unk>`` and pad = eos.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = _BERT_SPECIALS if family == "bert" else _DECODER_SPECIALS
    unk = specials[1] if family == "bert" else specials[0]
    vocab = _vocab(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=128,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        model_max_length=128,
        model_input_names=["input_ids", "attention_mask"],
    )


def _make_config(family: Family, vocab_size: int, overrides: dict[str, Any]) -> Any:
    """Tiny config for ``family``; ``overrides`` are passed to the config class."""
    import transformers as tf

    if family == "bert":
        kw: dict[str, Any] = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            type_vocab_size=2,
            pad_token_id=0,
            architectures=["BertModel"],
        )
        kw.update(overrides)
        return tf.BertConfig(**kw)
    if family == "gpt2":
        kw = dict(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            architectures=["GPT2LMHeadModel"],
        )
        kw.update(overrides)
        return tf.GPT2Config(**kw)
    if family == "llama":
        kw = dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"],
        )
        kw.update(overrides)
        return tf.LlamaConfig(**kw)
    raise ValueError(f"family must be one of 'bert', 'gpt2', 'llama', got {family!r}")


def make_tiny_model(
    root: Path,
    family: Family,
    *,
    seed: int = 0,
    with_tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Build, seed and save a tiny random HF model (+ tokenizer) under ``root/<family>``.

    Args:
        root: parent directory (e.g. pytest's ``tmp_path``).
        family: ``"bert"`` (``BertModel``, feature-extraction), ``"gpt2"``
            (``GPT2LMHeadModel``) or ``"llama"`` (``LlamaForCausalLM``, 4 query
            heads over 2 KV heads: GQA).
        seed: torch seed for the random weights.
        with_tokenizer: also save a word-level tokenizer whose vocabulary size
            equals ``config.vocab_size``.
        **overrides: config fields to override (e.g. ``architectures=["BertForMaskedLM"]``).

    Returns:
        The model directory (``config.json`` + ``model.safetensors`` [+ tokenizer files]).
    """
    import torch
    import transformers as tf

    tokenizer = _make_tokenizer(family)
    vocab_size = overrides.pop("vocab_size", len(tokenizer))
    config = _make_config(family, vocab_size, overrides)
    arch = (config.architectures or [""])[0]
    model_cls = getattr(tf, arch, None)
    if model_cls is None:
        raise ValueError(f"unknown architecture {arch!r} for family {family!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    out = Path(root) / family
    model.save_pretrained(out, safe_serialization=True)
    if with_tokenizer:
        tokenizer.save_pretrained(out)
    return out


def fortunes_path() -> Path:
    """The shared real-text file (one passage per line); skips the test if absent."""
    path = REPO_ROOT.parent / "shared" / "data" / "fortunes.txt"
    if not path.is_file():
        pytest.skip(f"shared data file not found: {path}")
    return path


def read_passages(n: int, offset: int = 0) -> list[str]:
    """``n`` non-empty passages from the fortunes file, starting at line ``offset``.

    Args:
        n: number of passages to return.
        offset: number of non-empty lines to skip first.
    """
    if n < 0 or offset < 0:
        raise ValueError(f"n and offset must be >= 0, got n={n}, offset={offset}")
    out: list[str] = []
    with fortunes_path().open(encoding="utf-8", errors="replace") as f:
        lines = (ln.strip() for ln in f)
        for i, ln in enumerate(ln for ln in lines if ln):
            if i < offset:
                continue
            if len(out) == n:
                break
            out.append(ln)
    return out
