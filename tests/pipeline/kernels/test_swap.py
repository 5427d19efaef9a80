"""swap_attention_ on tiny random BERT, GPT-2 and Llama (GQA) models built from configs."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

from pipeline.kernels import block_masks as bm
from pipeline.kernels import swap_attention_

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bert():
    return tf.BertModel(
        tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _llama():
    cfg = tf.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(cfg)


def _batch(padding_side):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 37), generator=g)
    mask = torch.ones(2, 37, dtype=torch.long)
    if padding_side == "right":
        mask[1, 29:] = 0
    else:
        mask[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize(
    "build,padding_side,kernel",
    [
        (_bert, "right", "flash"),
        (_bert, "right", "small_cache"),
        (_gpt2, "right", "flash"),
        (_gpt2, "left", "block_sparse"),
        (_llama, "left", "flash"),
        (_llama, "right", "small_cache"),
    ],
)
def test_swap_preserves_outputs_and_gradients(build, padding_side, kernel):
    torch.manual_seed(0)
    model = build().eval()
    ids, mask = _batch(padding_side)
    valid = mask.bool()  # padded positions differ by design (fully masked rows -> 0)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)[0]
        before_nomask = model(input_ids=ids[:1, :20])[0]
    n = swap_attention_(model, kernel=kernel, cache_words=4096, block_size=8 if kernel == "block_sparse" else None)
    assert n == 2
    after = model(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(after[valid], before[valid], rtol=0, atol=1e-5)
    with torch.no_grad():  # no mask: causal models rely on is_causal
        torch.testing.assert_close(model(input_ids=ids[:1, :20])[0], before_nomask, rtol=0, atol=1e-5)
    after[valid].pow(2).mean().backward()
    attn_params = [
        p
        for name, p in model.named_parameters()
        if any(s in name for s in ("attention.self", "attn.c_attn", "self_attn"))
    ]
    assert attn_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn_params)


def test_block_mask_fn_is_used():
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids, _ = _batch("right")
    with torch.no_grad():
        dense = model(input_ids=ids)[0]
    swap_attention_(
        model,
        kernel="block_sparse",
        block_size=8,
        block_mask_fn=lambda nq, nk: bm.sliding_window(-(-nq // 8), -(-nk // 8), 0, causal=True),
    )
    with torch.no_grad():
        local = model(input_ids=ids)[0]
    torch.testing.assert_close(local[:, :8], dense[:, :8], rtol=0, atol=1e-5)  # first block sees the same keys
    assert (local[:, 8:] - dense[:, 8:]).abs().max() > 1e-3  # later blocks lost their far keys


def test_swap_raises_when_nothing_matches():
    with pytest.raises(ValueError, match="no BERT"):
        swap_attention_(torch.nn.Sequential(torch.nn.Linear(4, 4)), kernel="flash")
    with pytest.raises(ValueError, match="'bogus'"):
        swap_attention_(_gpt2(), kernel="bogus")


def test_dropout_in_training_raises():
    model = _gpt2().train()
    swap_attention_(model, kernel="flash")
    ids, mask = _batch("right")
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids, attention_mask=mask)
