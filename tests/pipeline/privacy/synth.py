"""A synthetic low-dimension decoder for the DP-context tests: tiny GPT-2 with head dim 2 whose query/key/value
weights are scaled up so attention over the context is informative (not uniform)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import _CORPUS, _TOKEN_RE, make_tiny_model


def make_low_dim_gpt2(root: Path, *, n_positions: int = 8192 + 64, gain: float = 8.0, seed: int = 0) -> Path:
    """GPT-2, 1 layer, 4 heads of dimension 2 (n_embd 8); q/k/v projections multiplied by ``gain``."""
    from safetensors.torch import load_file, save_file

    path = make_tiny_model(root, "gpt2", seed=seed, n_embd=8, n_head=4, n_layer=1, n_positions=n_positions)
    f = path / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("attn.c_attn.weight"))
    sd[key] = sd[key] * gain  # (8, 24): q | k | v columns
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    return path


def corpus_words() -> list[str]:
    return [w for line in _CORPUS for w in _TOKEN_RE.findall(line)]
