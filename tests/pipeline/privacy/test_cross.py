"""The encoder-output form of private context (issue 14): DP cross-attention of a tiny random BART decoder layer
over its encoder's output, against exact cross-attention and the uniform baseline; ONNX export with parity and
no raw context in the graph."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from pipeline.privacy.cross import DPCrossAttention, cross_kv, exact_cross_attention, export_dp_cross_attention
from pipeline.privacy.model import DPPrefix
from pipeline.privacy.release import KernelSpec, PublicBounds, noisy_layer_sums
from pipeline.privacy.sampler import SeededSampler

N_CTX = 4096


@functools.lru_cache(maxsize=1)
def _bart(gain: float = 5.0, value_gain: float = 10.0):
    """BART, 1 encoder + 1 decoder layer, width 8, 4 heads of dim 2; the decoder's cross-attention q/k maps
    scaled by ``gain`` so attention over the context is informative (not uniform), v by ``value_gain`` (values
    well above the sums' count column); out_proj without bias (errors are measured on the attention itself).
    Returns (model, cross-attention, raw context K and V (H, n, d), public bounds)."""
    from transformers import BartConfig, BartModel

    torch.manual_seed(0)
    conf = BartConfig(
        vocab_size=64,
        d_model=8,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=N_CTX + 8,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = BartModel(conf).eval()
    attn = model.decoder.layers[0].encoder_attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(gain)
        attn.k_proj.weight.mul_(gain)
        attn.v_proj.weight.mul_(value_gain)
        attn.out_proj.bias.zero_()
    gen = torch.Generator().manual_seed(0)
    private = torch.randint(4, 64, (N_CTX,), generator=gen)
    public = torch.randint(4, 64, (512,), generator=gen)
    K, V = cross_kv(attn, _encode(model, private))  # (H, n, d) raw context: provider side only
    Kp, Vp = cross_kv(attn, _encode(model, public))  # public text sets the bounds
    return model, attn, K, V, PublicBounds(float(np.abs(Kp).max()), float(np.abs(Vp).max()))


def _encode(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encoder(input_ids=ids[None]).last_hidden_state[0]  # (n, C)


def _release(*, epsilon: float, degree: int = 4, seed: int = 0):
    _, attn, K, V, bounds = _bart()
    spec = KernelSpec(K.shape[-1], degree, float(attn.scaling))
    sums, plan = noisy_layer_sums([(K, V)], spec, bounds, epsilon=epsilon, delta=1e-5, sampler=SeededSampler(seed))
    rel = DPPrefix(
        n=N_CTX,
        degree=degree,
        scale=spec.scale,
        key_bound=bounds.key_bound,
        value_bound=bounds.value_bound,
        sums=sums,
        meta={"sigma": plan.sigmas[0], "exact_delta": plan.exact_delta},
    )
    return rel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_dp_cross_attention_tracks_exact_cross_attention_in_the_usable_region():
    model, attn, K, V, _ = _bart()
    hidden = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(1))  # decoder states (public queries)
    dp = DPCrossAttention.from_bart(attn, _release(epsilon=16.0), 0)
    with torch.no_grad():
        got, none = dp(hidden, key_value_states=torch.zeros(3, 1, 8))  # the encoder output is not used
        exact = exact_cross_attention(attn, hidden, K, V, float(attn.scaling))
        enc = _encode(model, torch.randint(4, 64, (N_CTX,), generator=torch.Generator().manual_seed(0)))
        hf = attn(hidden_states=hidden, key_value_states=enc[None].expand(3, -1, -1))[0]
    assert none is None and got.shape == (3, 9, 8)
    assert _rel(exact, hf) < 1e-5  # the float64 reference is what the BART layer computes over the raw context
    # the uniform-attention baseline: every query gets the mean value of each head
    uniform = torch.nn.functional.linear(
        torch.from_numpy(V.mean(1)).reshape(1, 1, -1).expand(3, 9, -1), attn.out_proj.weight.double()
    )
    err, base = _rel(got, exact), _rel(uniform, exact)
    assert base > 0.15  # attention over the context is informative here
    assert err < 0.1 and err < base / 2, (err, base)
    # the same release with much less budget is noise-dominated: the error grows as 1/ε
    with torch.no_grad():
        lo = DPCrossAttention.from_bart(attn, _release(epsilon=0.5), 0)(hidden)[0]
    assert _rel(lo, exact) > 2 * err


def test_dp_cross_attention_exports_with_parity_and_no_raw_context(tmp_path):
    import onnx
    import onnxruntime as ort

    _, attn, K, V, _ = _bart()
    rel = _release(epsilon=16.0)
    dp = DPCrossAttention.from_bart(attn, rel, 0).eval()
    path = export_dp_cross_attention(dp, tmp_path / "cross.onnx", width=8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3), (4, 11)):  # dynamic batch and length
        x = torch.randn(*shape, 8, generator=torch.Generator().manual_seed(shape[1]))
        (got,) = sess.run(None, {"hidden_states": x.numpy()})
        with torch.no_grad():
            want = dp(x)[0].numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
    # the graph holds S̃ but no raw key or value row (float32 or float64) of the context
    data = path.read_bytes() + b"".join(
        t.raw_data for t in onnx.load(str(path), load_external_data=True).graph.initializer
    )
    assert np.ascontiguousarray(rel.sums[0][0]).tobytes()[:64] in data  # positive control: the release is there
    for h in range(K.shape[0]):
        for i in (0, 1, N_CTX // 2, N_CTX - 1):
            for M in (K, V):
                for dt in (np.float32, np.float64):
                    assert np.asarray(M[h, i], dtype=dt).tobytes() not in data


def test_dp_cross_attention_refuses_a_mismatched_release():
    attn = _bart()[1]
    rel = _release(epsilon=16.0)
    with pytest.raises(ValueError, match="no sums for layer 1"):
        DPCrossAttention.from_bart(attn, rel, 1)
    bad = DPPrefix(rel.n, rel.degree, rel.scale * 2, rel.key_bound, rel.value_bound, rel.sums)
    with pytest.raises(ValueError, match="softmax scaling"):
        DPCrossAttention.from_bart(attn, bad, 0)
