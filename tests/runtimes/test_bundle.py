"""Tests for runtimes.bundle + bundle_files/evaluate.py + runtimes.benchmark.

evaluate.py is run with a venv that has ONLY numpy and onnxruntime (what a device has),
cached under <repo>/.cache/ keyed by the versions and Python.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtimes.benchmark import BundleRunError, benchmark_bundle
from runtimes.bundle import write_bundle
from tests.runtimes.bundles import tiny_encoder_case, write_test_bundle
from tests.runtimes.test_session import tiny_encoder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    model, feeds, ref = tiny_encoder_case(tmp_path / "tiny.onnx")
    return write_test_bundle(
        tmp_path / "bundle",
        model,
        feeds,
        ref,
        atol=1e-5,
        min_cosine=0.999,
        providers=["XnnpackExecutionProvider", "CPUExecutionProvider"],
        runs=5,
        warmup=1,
    )


def test_bundle_layout(bundle: Path) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md",
        "bundle.json",
        "evaluate.py",
        "inputs.npz",
        "memory_probe.py",
        "reference.npz",
        "tiny.onnx",
    ]
    cfg = json.loads((bundle / "bundle.json").read_text())
    assert cfg["model_file"] == "tiny.onnx" and cfg["mask_input"] == "attention_mask"
    assert cfg["atol"] == 1e-5 and cfg["min_cosine"] == 0.999 and cfg["runs"] == 5 and cfg["threads"] == 1
    assert cfg["providers"][0] == "XnnpackExecutionProvider"
    with np.load(bundle / "inputs.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["attention_mask", "input_ids"]
    assert not list(bundle.parent.glob(".bundle.*")), "staging folder left behind"


def test_evaluate_ok_in_numpy_ort_only_venv(bundle: Path, device_python: str) -> None:
    proc = subprocess.run([device_python, "evaluate.py", "--runs", "3"], cwd=bundle, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "exactly one JSON object on stdout"
    res = json.loads(lines[0])
    assert res["ok"] is True and res["max_abs_diff"] <= 1e-5 and res["cosine_min"] > 0.9999
    assert res["provider"] == "CPUExecutionProvider" and res["onnxruntime"] == ort.__version__
    assert res["model"] == "tiny.onnx" and res["runs"] == 3
    assert 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p95"]
    assert 5 < res["peak_rss_mb"] < 2000  # a real MB figure, not KiB or bytes


def test_memory_probe_runs_in_numpy_ort_only_venv(bundle: Path, device_python: str) -> None:
    proc = subprocess.run(
        [device_python, "memory_probe.py", "tiny.onnx", "inputs.npz", "--threads", "1"],
        cwd=bundle,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # the model's own memory: a tiny encoder is a few MiB (session overhead), far below the ~30+ MiB interpreter
    assert 0 < res["model_mb"] < res["baseline_mb"] and res["provider"] == "CPUExecutionProvider"


def test_corrupted_reference_fails(bundle: Path, device_python: str) -> None:
    with np.load(bundle / "reference.npz", allow_pickle=False) as z:
        ref = z["last_hidden_state"].copy()
    ref[0, 0, :] += 0.5  # a valid (unpadded) position
    np.savez(bundle / "reference.npz", last_hidden_state=ref)
    res = benchmark_bundle(bundle, python=device_python, runs=2)
    assert res["ok"] is False and res["exit_code"] == 1
    assert res["max_abs_diff"] == pytest.approx(0.5, abs=1e-5)


def test_padded_positions_are_ignored(bundle: Path, device_python: str) -> None:
    with np.load(bundle / "reference.npz", allow_pickle=False) as z:
        ref = z["last_hidden_state"].copy()
    ref[1, -1, :] = 123.0  # row 1 is right-padded over its last 3 positions
    np.savez(bundle / "reference.npz", last_hidden_state=ref)
    res = benchmark_bundle(bundle, python=device_python, runs=2, threads=1)
    assert res["ok"] is True and res["exit_code"] == 0


def test_benchmark_bundle_parses_json(bundle: Path) -> None:
    res = benchmark_bundle(bundle, runs=2)  # current interpreter is fine too
    assert res["ok"] is True and res["exit_code"] == 0 and res["runs"] == 2


def test_benchmark_bundle_errors(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"evaluate.py"):
        benchmark_bundle(tmp_path)
    (bundle / "tiny.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleRunError, match="exit code 2"):
        benchmark_bundle(bundle, runs=1)


def test_write_bundle_validates(tmp_path: Path) -> None:
    model = tiny_encoder(tmp_path / "tiny.onnx")
    kw = dict(
        model_path=model,
        sample_inputs={"x": np.zeros(1)},
        reference_outputs={"y": np.zeros(1)},
        rtol=0.0,
        min_cosine=None,
        threads=1,
        providers=[],
    )
    with pytest.raises(ValueError, match=r"-0.1"):
        write_bundle(tmp_path / "b", atol=-0.1, **kw)
    with pytest.raises(ValueError, match="object"):
        write_bundle(tmp_path / "b", atol=0.1, **(kw | {"reference_outputs": {"y": np.array([None])}}))
    with pytest.raises(FileNotFoundError):
        write_bundle(tmp_path / "b", atol=0.1, **(kw | {"model_path": tmp_path / "missing.onnx"}))


def test_peak_rss_is_the_bundle_process_own(bundle: Path) -> None:
    """A large parent must not leak its peak RSS into the child's number (Linux keeps ru_maxrss across exec)."""
    import numpy as np

    ballast = np.ones(600 * 1024 * 1024 // 8)  # ~600 MB touched in this (parent) process
    res = benchmark_bundle(bundle, runs=2)
    assert ballast[-1] == 1.0
    assert 0 < res["peak_rss_mb"] < 400, res["peak_rss_mb"]
