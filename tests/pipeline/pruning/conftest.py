"""Tiny in-code models and batches for the pruning tests (offline, seeded)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

FAMILIES = ("bert", "gpt2", "llama")
# same adapters, other layouts: DistilBERT (q_lin/out_lin, ffn.lin1/lin2), Qwen2 (Llama layout + q/k/v biases)
MORE_FAMILIES = ("distilbert", "qwen2")


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """2-layer, hidden 32, 4 heads (Llama: 2 KV heads); odd FFN width for BERT to exercise N:M tails."""
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = T.BertConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            initializer_range=0.2,
        )
        model = T.BertForMaskedLM(cfg)
    elif kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)
        model = T.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = T.LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            initializer_range=0.2,
        )
        model = T.LlamaForCausalLM(cfg)
    elif kind == "distilbert":
        cfg = T.DistilBertConfig(
            vocab_size=97,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=40,
            max_position_embeddings=64,
            initializer_range=0.2,
        )
        model = T.DistilBertForMaskedLM(cfg)
    elif kind == "qwen2":
        cfg = T.Qwen2Config(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=40,
            max_position_embeddings=64,
            initializer_range=0.2,
        )
        model = T.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # Qwen2 inits biases to 0; make them matter for the adapter tests
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    else:
        raise ValueError(kind)
    return model.eval()


def random_batches(count: int = 2, batch: int = 2, seq: int = 11, vocab: int = 97, seed: int = 1) -> list[dict]:
    """Random token batches; the second row of each batch is right-padded (3 pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        am = torch.ones_like(ids)
        am[-1, seq - 3 :] = 0
        out.append({"input_ids": ids, "attention_mask": am})
    return out


@pytest.fixture
def batches() -> list[dict]:
    return random_batches()
