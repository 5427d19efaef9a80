"""Tests for runtimes.generate: greedy ids from the ORT KV-cache loop equal PyTorch's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exporters.onnx import ExportResult, export_onnx
from pipeline.models import LoadedModel, load_model
from runtimes.generate import greedy_generate_ort, greedy_generate_torch
from tests.helpers import make_tiny_model

PROMPTS = (
    "the quick brown fox",
    "hello world",
    "all models are wrong but some are useful",
)
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LoadedModel, ExportResult]:
    root = tmp_path_factory.mktemp(f"gen-{request.param}")
    # initializer_range 0.2: a spread of logits, so greedy picks are not decided by float noise
    loaded = load_model(make_tiny_model(root, request.param, initializer_range=0.2))
    return loaded, export_onnx(loaded, root / "onnx")


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _no_cache_greedy(loaded: LoadedModel, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Independent oracle: re-run the full sequence each step, no KV cache at all."""
    out, m = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.inference_mode():
        for _ in range(n):
            pos = (m.cumsum(1) - 1).clamp(min=0)
            logits = loaded.model(input_ids=out, attention_mask=m, position_ids=pos, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out, m = torch.cat([out, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return out.numpy()


def test_prompts_one_by_one(decoder: tuple[LoadedModel, ExportResult]) -> None:
    loaded, result = decoder
    assert loaded.tokenizer is not None
    sess = _session(result.path)
    generated = []
    for prompt in PROMPTS:
        ids = loaded.tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)
        got = greedy_generate_ort(sess, result, ids, NEW_TOKENS)
        ref = greedy_generate_torch(loaded, ids, NEW_TOKENS)
        assert got.shape == (1, ids.shape[1] + NEW_TOKENS)
        np.testing.assert_array_equal(got[:, : ids.shape[1]], ids)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(ref, _no_cache_greedy(loaded, ids, np.ones_like(ids), NEW_TOKENS))
        generated.append(tuple(got[0, ids.shape[1] :]))
    # a model stuck on one token for every prompt would make the comparison vacuous
    assert len({tok for g in generated for tok in g}) > 2


def test_left_padded_batch(decoder: tuple[LoadedModel, ExportResult]) -> None:
    """A left-padded batch generates exactly what each prompt generates alone."""
    loaded, result = decoder
    tok = loaded.tokenizer
    assert tok is not None
    tok.padding_side = "left"
    enc = tok(list(PROMPTS), padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    assert (mask == 0).any()
    sess = _session(result.path)
    got = greedy_generate_ort(sess, result, ids, NEW_TOKENS, attention_mask=mask)
    ref = greedy_generate_torch(loaded, ids, NEW_TOKENS, attention_mask=mask)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(ref, _no_cache_greedy(loaded, ids, mask, NEW_TOKENS))
    for row, prompt in enumerate(PROMPTS):
        single = tok(prompt, return_tensors="np")["input_ids"].astype(np.int64)
        alone = greedy_generate_ort(sess, result, single, NEW_TOKENS)
        np.testing.assert_array_equal(got[row, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])


def test_zero_new_tokens_and_bad_input(decoder: tuple[LoadedModel, ExportResult]) -> None:
    loaded, result = decoder
    ids = np.array([[3, 4, 5]], dtype=np.int64)
    sess = _session(result.path)
    np.testing.assert_array_equal(greedy_generate_ort(sess, result, ids, 0), ids)
    np.testing.assert_array_equal(greedy_generate_torch(loaded, ids, 0), ids)
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        greedy_generate_ort(sess, result, ids[0], 2)
    with pytest.raises(ValueError, match="-1"):
        greedy_generate_torch(loaded, ids, -1)
    with pytest.raises(ValueError, match="attention_mask shape"):
        greedy_generate_ort(sess, result, ids, 2, attention_mask=np.ones((1, 2), np.int64))


def test_no_cache_export_generates_the_same(decoder: tuple[LoadedModel, ExportResult], tmp_path: Path) -> None:
    """The re-run-everything path (export without KV cache, here via optimum) gives the same ids."""
    loaded, cached = decoder
    plain = export_onnx(loaded, tmp_path, exporter="optimum", with_past=False)
    assert not plain.with_past and not plain.past_names
    ids = np.array([[3, 9, 27, 5, 11]], dtype=np.int64)
    got = greedy_generate_ort(_session(plain.path), plain, ids, NEW_TOKENS)
    np.testing.assert_array_equal(got, greedy_generate_ort(_session(cached.path), cached, ids, NEW_TOKENS))
    np.testing.assert_array_equal(got, greedy_generate_torch(loaded, ids, NEW_TOKENS))
