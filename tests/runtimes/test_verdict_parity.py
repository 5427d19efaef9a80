"""The device bundle's evaluate.py copies the host's comparison rule on purpose (it must run with numpy +
onnxruntime alone). This holds the two copies to identical verdicts on the same inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from runtimes.compare import compare

EVALUATE = Path(__file__).resolve().parents[2] / "runtimes" / "bundle_files" / "evaluate.py"


@pytest.fixture(scope="module")
def evaluate():
    spec = importlib.util.spec_from_file_location("bundle_evaluate", EVALUATE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases(rng: np.random.Generator):
    """(ref, got, atol, rtol, min_cosine, mask): random outputs with the failure kinds a device sees."""
    for i in range(400):
        b, s, d = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 7)
        ref = {"a": rng.standard_normal((b, s, d)).astype(np.float32)}
        if i % 3 == 0:
            ref["b"] = rng.standard_normal((b, d)).astype(np.float32)
        scale = float(10.0 ** rng.uniform(-7, 0))
        got = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ref.items()}
        kind = i % 10
        if kind == 1:
            got["a"].flat[rng.integers(got["a"].size)] = np.nan
        elif kind == 2:
            got["a"].flat[0] = np.inf
        elif kind == 3:
            got["a"] = got["a"][:, :0]  # shape mismatch
        elif kind == 4:
            ref["a"][:, :, :] = 0.0
            got["a"][:, :, :] = 0.0  # zero rows on both sides count as cosine 1
        elif kind == 5:
            got["a"] = -got["a"]  # anti-correlated, maybe within a loose atol
        elif kind == 6:
            ref["e"] = np.zeros((b, 0), np.float32)
            got["e"] = np.zeros((b, 0), np.float32)  # empty output: cosine undefined
        elif kind == 7:
            got.pop("a")  # an output missing on the device
        mask = None
        if i % 2:
            mask = (rng.random((b, s)) > 0.3).astype(np.int64)
            mask[:, 0] = 1
        atol = float(10.0 ** rng.uniform(-6, 1))
        rtol = float(rng.choice([0.0, 1e-3]))
        min_cos = [None, 0.99, 0.999999, -1.0][i % 4]
        yield ref, got, atol, rtol, min_cos, mask


def test_bundle_and_host_give_identical_verdicts(evaluate) -> None:
    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for ref, got, atol, rtol, min_cos, mask in _cases(rng):
        host = all(c.ok for c in compare(ref, got, atol=atol, rtol=rtol, min_cosine=min_cos, mask=mask))
        device, _ = evaluate.verdict(ref, got, atol, rtol, min_cos, mask)
        assert host == device, (atol, rtol, min_cos, {k: v.shape for k, v in got.items()})
        seen[host] += 1
    assert min(seen.values()) > 50, seen  # both verdicts exercised


def test_bundle_metrics_match_host_metrics(evaluate) -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 5, 7)).astype(np.float32)
    got = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    (host,) = compare({"x": ref}, {"x": got}, atol=1e-2, mask=mask)
    dev = evaluate.check(ref, got, 1e-2, 0.0, mask)
    assert dev["max_abs_diff"] == pytest.approx(host.max_abs_diff, rel=1e-12)
    assert dev["cosine_min"] == pytest.approx(host.cosine_min, rel=1e-12)
