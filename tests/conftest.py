"""Shared fixtures: offline environment, tiny models built from configs, the repo root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random BERT, GPT-2 and Llama (GQA) directory per test session."""
    from tests.helpers import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {f: make_tiny_model(root, f) for f in ("bert", "gpt2", "llama")}


@pytest.fixture(scope="session")
def device_python() -> str:
    """Python of a venv with only numpy + onnxruntime (same versions as here), built once and cached."""
    import numpy as np
    import onnxruntime as ort

    key = f"device-venv-py{sys.version_info.major}.{sys.version_info.minor}-numpy{np.__version__}-ort{ort.__version__}"
    venv = REPO / ".cache" / key
    py = venv / "bin" / "python"
    marker = venv / ".complete"
    if not marker.exists():
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        r = subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"numpy=={np.__version__}",
                f"onnxruntime=={ort.__version__}",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if r.returncode != 0:
            pytest.skip(f"could not build the numpy+onnxruntime venv (offline, no pip cache?): {r.stderr[-500:]}")
        marker.write_text("ok\n")
    # the device venv must not see torch/edgepipe: evaluate.py may import only numpy + onnxruntime
    probe = subprocess.run(
        [str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "True"
    return str(py)
