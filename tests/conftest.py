"""Shared fixtures: offline environment, tiny models built from configs, the repo root."""

from __future__ import annotations

import os
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
