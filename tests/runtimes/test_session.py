"""Tests for runtimes.session: provider filtering, session options, feed selection."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtimes.session import available_providers, feeds_for, make_session

VOCAB, HIDDEN = 37, 24


def tiny_encoder(path: Path, seed: int = 0) -> Path:
    """Tiny 'encoder' built with onnx.helper: (input_ids, attention_mask) -> last_hidden_state (B, S, H).

    h = Tanh(Embedding[input_ids] @ W) * attention_mask[..., None]; it has a padding-dependent
    output so padding-aware checks have something to ignore.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),  # (B, S, H)
        helper.make_node("MatMul", ["e", "W"], ["m"]),
        helper.make_node("Tanh", ["m"], ["t"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "last_axis"], ["m3"]),  # (B, S) -> (B, S, 1)
        helper.make_node("Mul", ["t", "m3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def sample_encodings(b: int = 2, s: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """int32 encodings (as some tokenizers give) with right padding on the second row, plus an extra key."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int32)
    mask[1, s - 3 :] = 0
    return {
        "input_ids": rng.integers(0, VOCAB, (b, s)).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((b, s), np.int32),  # not declared by the model: must be dropped
    }


def test_available_providers_keeps_order_and_ends_with_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="runtimes.session"):
        got = available_providers(["NopeExecutionProvider", "CPUExecutionProvider", "AlsoMissingEP"])
    assert got == ["CPUExecutionProvider"]
    assert "NopeExecutionProvider" in caplog.text and "AlsoMissingEP" in caplog.text
    assert available_providers([]) == ["CPUExecutionProvider"]


def test_available_providers_keeps_present_ones() -> None:
    import onnxruntime as ort

    extra = [p for p in ort.get_available_providers() if p != "CPUExecutionProvider"]
    got = available_providers(["CPUExecutionProvider", *extra, "Missing"])
    assert got == [*extra, "CPUExecutionProvider"]


def test_make_session_and_feeds(tmp_path: Path) -> None:
    path = tiny_encoder(tmp_path / "m.onnx")
    sess = make_session(path, providers=["MissingEP"], threads=1, graph_optimization="disable")
    assert sess.get_providers() == ["CPUExecutionProvider"]
    enc = sample_encodings()
    feeds = feeds_for(sess, enc)
    assert list(feeds) == ["input_ids", "attention_mask"]
    assert all(v.dtype == np.int64 for v in feeds.values())
    (out,) = sess.run(None, feeds)
    assert out.shape == (2, 7, HIDDEN)
    assert np.all(out[1, 4:] == 0)  # padded positions zeroed by the mask


def test_make_session_errors(tmp_path: Path) -> None:
    path = tiny_encoder(tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="'fastest'"):
        make_session(path, graph_optimization="fastest")
    with pytest.raises(ValueError, match="0"):
        make_session(path, threads=0)
    with pytest.raises(FileNotFoundError, match=r"nope.onnx"):
        make_session(tmp_path / "nope.onnx")


def test_feeds_for_missing_input_is_clear(tmp_path: Path) -> None:
    sess = make_session(tiny_encoder(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="attention_mask"):
        feeds_for(sess, {"input_ids": np.zeros((1, 3), np.int64)})
