"""The DP-prefix rewrite of GPT-2 / Llama attention: with a noise-free, exact-kernel release it must reproduce
the unmodified model that reads the raw prefix (the oracle), with padding, batches and GQA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models import load_model
from pipeline.privacy.model import (
    DPPrefix,
    QueryRecorder,
    apply_dp_prefix_,
    context_kv,
    exact_prefix_logits,
    fit_projection,
)
from pipeline.privacy.release import KernelSpec, PublicBounds, exact_sums


def _prefix(model, ids, degree, proj_dim=None):
    kv = context_kv(model, ids)
    H, n, d = kv[0][0].shape
    R = max(float(np.abs(K).max()) for K, _ in kv) * 1.01
    Rw = max(float(np.abs(V).max()) for _, V in kv) * 1.01
    proj = {l: fit_projection(K, proj_dim) for l, (K, _) in enumerate(kv)} if proj_dim else {}
    p = proj_dim or d
    spec = KernelSpec(p, degree, 1 / np.sqrt(d))
    sums = {}
    for l, (K, V) in enumerate(kv):
        Kp = np.einsum("hnd,hdp->hnp", K, proj[l]) if proj else K
        sums[l] = np.stack([exact_sums(Kp[h], V[h], spec, PublicBounds(R * 4, Rw)) for h in range(H)])
    return DPPrefix(n=n, degree=degree, scale=1 / np.sqrt(d), key_bound=R * 4, value_bound=Rw, sums=sums, proj=proj), kv


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_noise_free_release_reproduces_the_exact_prefix_model(tiny_models, family):
    loaded = load_model(tiny_models[family])
    ids = torch.tensor(
        loaded.tokenizer("the quick brown fox jumps over the lazy dog all models are wrong", add_special_tokens=False)[
            "input_ids"
        ]
    )
    batch = dict(
        loaded.tokenizer(
            ["hello world this is", "time flies like an arrow fruit flies"], return_tensors="pt", padding=True
        )
    )
    ref = exact_prefix_logits(loaded.model, ids, batch)
    # full-rank projection (an orthogonal basis) must change nothing either
    prefix, _ = _prefix(
        loaded.model, ids, degree=6, proj_dim=loaded.model.config.hidden_size // loaded.model.config.num_attention_heads
    )
    plain = load_model(tiny_models[family])
    assert apply_dp_prefix_(plain.model, prefix) == loaded.model.config.num_hidden_layers
    with torch.no_grad():
        got = plain.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    m = batch["attention_mask"].bool()
    assert (got - ref)[m].abs().max().item() < 1e-5
    # the same rewrite with a truncated projection differs (the check can fail)
    prefix2, _ = _prefix(loaded.model, ids, degree=6, proj_dim=1)
    low = load_model(tiny_models[family])
    apply_dp_prefix_(low.model, prefix2)
    with torch.no_grad():
        got2 = low.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (got2 - ref)[m].abs().max().item() > 1e-4


def test_recorder_sees_the_dp_context_part_and_release_round_trips(tiny_models, tmp_path):
    loaded = load_model(tiny_models["llama"])
    ids = torch.tensor(loaded.tokenizer("you have taken yourself too seriously", add_special_tokens=False)["input_ids"])
    prefix, kv = _prefix(loaded.model, ids, degree=6)
    path = tmp_path / "r.safetensors"
    prefix.save(path)
    back = DPPrefix.load(path)
    assert back.n == prefix.n and back.meta == prefix.meta and set(back.sums) == set(prefix.sums)
    rec = QueryRecorder()
    apply_dp_prefix_(loaded.model, back, recorder=rec)
    batch = dict(loaded.tokenizer(["we prune heads"], return_tensors="pt"))
    with torch.no_grad():
        loaded.model(**batch)
    layer, q, c = rec.rows[0]
    K, V = kv[layer]
    G = q.shape[1] // K.shape[0]
    from pipeline.privacy.release import exact_attention

    ex = exact_attention(q[0, 0].double().numpy(), K[0], V[0], prefix.scale)
    np.testing.assert_allclose(c[0, 0].double().numpy(), ex, atol=1e-5)
    assert G == 2  # GQA: 4 query heads over 2 KV heads share a release


def test_a_release_missing_a_layer_is_refused(tiny_models):
    loaded = load_model(tiny_models["gpt2"])
    ids = torch.tensor([3, 4, 5, 6])
    prefix, _ = _prefix(loaded.model, ids, degree=2)
    prefix.sums.pop(1)
    with pytest.raises(ValueError, match="no sums for layers"):
        apply_dp_prefix_(loaded.model, prefix)
