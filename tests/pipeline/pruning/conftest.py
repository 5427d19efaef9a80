"""Tiny in-code models and batches for the pruning tests (offline, seeded)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

FAMILIES = ("bert", "gpt2", "llama")
# same adapters, other layouts: DistilBERT (q_lin/out_lin, ffn.lin1/lin2), Qwen2 (Llama layout + q/k/v biases)
MORE_FAMILIES = ("distilbert", "qwen2")


# kind -> (config class, model class, config fields beyond the shared vocab 97 / 2 layers / 4 heads / 64 positions)
_TINY = {
    "bert": (T.BertConfig, T.BertForMaskedLM, {"intermediate_size": 37}),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, {}),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {"num_key_value_heads": 2, "intermediate_size": 48}),
    "distilbert": (T.DistilBertConfig, T.DistilBertForMaskedLM, {"hidden_dim": 40}),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {"num_key_value_heads": 2, "intermediate_size": 40}),
}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """2-layer, hidden 32, 4 heads (Llama, Qwen2: 2 KV heads); odd FFN width for BERT to exercise N:M tails."""
    if kind not in _TINY:
        raise ValueError(kind)
    config_cls, model_cls, extra = _TINY[kind]
    torch.manual_seed(seed)
    # the standard names; GPT2Config and DistilBertConfig map them to their own (n_embd, dim, ...)
    cfg = config_cls(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,
        **extra,
    )
    model = model_cls(cfg)
    if kind == "qwen2":
        with torch.no_grad():  # Qwen2 inits biases to 0; make them matter for the adapter tests
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
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
