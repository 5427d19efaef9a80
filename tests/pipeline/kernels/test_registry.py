"""A new attention kernel is one file plus one registration: a toy kernel registered here is accepted by
``attention``, ``swap_attention_`` and the ``attention`` stage's config, with no other change."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pipeline.errors import ConfigError
from pipeline.kernels import KERNELS, attention, attention_ref, register_kernel, stage_kernels, swap_attention_
from pipeline.kernels.change import AttentionChange, apply_attention_change


@pytest.fixture
def toy_kernel():
    calls = []

    @register_kernel("toy_float64", description="dense attention computed in float64 (test)")
    def toy(q, k, v, *, causal, attn_mask, block_mask, scale, cache_words, block_size):
        calls.append(q.shape)
        return attention_ref(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale).to(q.dtype)

    yield calls
    KERNELS.pop("toy_float64")


def test_builtin_kernels_are_registered() -> None:
    assert {"flash", "small_cache", "block_sparse", "naive"} <= set(KERNELS)
    assert KERNELS["naive"].oracle and "naive" not in stage_kernels()
    assert KERNELS["block_sparse"].block_sparse and not KERNELS["flash"].block_sparse


def test_toy_kernel_through_attention_swap_and_stage_config(toy_kernel) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 5, generator=g) for _ in range(3))
    out = attention(q, k, v, kernel="toy_float64", causal=True)
    torch.testing.assert_close(out, attention(q, k, v, kernel="flash", causal=True), atol=1e-6, rtol=0)

    model = tf.BertModel(
        tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).eval()
    ids = torch.randint(0, 100, (2, 11), generator=g)
    with torch.no_grad():
        dense = model(input_ids=ids).last_hidden_state
        assert apply_attention_change(model, AttentionChange("toy_float64")) == 2
        swapped = model(input_ids=ids).last_hidden_state
    assert len(toy_kernel) == 1 + 2  # the direct call, then one call per layer
    torch.testing.assert_close(swapped, dense, atol=1e-5, rtol=0)

    from pipeline.config import parse_config

    cfg = parse_config({"targets": ["host-cpu"], "stages": [{"attention": {"kernel": "toy_float64"}}, {"export": {}}]})
    assert cfg.stages[0].kernel == "toy_float64"


def test_unknown_kernels_are_refused_with_the_registered_names() -> None:
    from pipeline.config import parse_config

    with pytest.raises(ConfigError, match=r"stages\[0\]\.attention\.kernel.*block_sparse, flash, small_cache"):
        parse_config({"targets": ["host-cpu"], "stages": [{"attention": {"kernel": "naive"}}]})
    with pytest.raises(ValueError, match="unknown attention kernel 'nope'"):
        swap_attention_(torch.nn.Linear(2, 2), kernel="nope")
    with pytest.raises(ValueError, match="registered twice"):
        register_kernel("flash", description="again")(lambda *a, **k: None)
