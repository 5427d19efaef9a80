"""Evaluation bundles for the tests: the tiny encoder's reference run and ``write_bundle`` with the tests' settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtimes.bundle import write_bundle
from runtimes.session import feeds_for, make_session
from tests.runtimes.test_session import sample_encodings, tiny_encoder


def tiny_encoder_case(path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """The tiny encoder written to ``path``, its feeds and its ONNX Runtime output (B, S, D) as the reference."""
    model = tiny_encoder(path)
    sess = make_session(model, threads=1)
    feeds = feeds_for(sess, sample_encodings())
    (ref,) = sess.run(None, feeds)
    return model, feeds, ref


def write_test_bundle(
    out_dir: Path, model: Path, feeds: dict[str, np.ndarray], ref: np.ndarray, **overrides: Any
) -> Path:
    """``write_bundle`` of ``model`` checked against ``ref`` as ``last_hidden_state``: rtol 0, one thread, and unless
    ``overrides`` (any ``write_bundle`` keyword) say otherwise atol 1e-4, min cosine 0.9999, the CPU provider."""
    kw: dict[str, Any] = {
        "atol": 1e-4,
        "rtol": 0.0,
        "min_cosine": 0.9999,
        "threads": 1,
        "providers": ["CPUExecutionProvider"],
    }
    return write_bundle(
        out_dir, model_path=model, sample_inputs=feeds, reference_outputs={"last_hidden_state": ref}, **kw | overrides
    )
