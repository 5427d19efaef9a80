"""Closed-form and factorized attention gradients (notes §1 (b), (c), (d)) against autograd and finite differences."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.lowrank import (
    CausalTransformer,
    attention_layer,
    attention_layer_grads,
    lowrank_attention,
    softmax_attention_grads_ref,
    softmax_attention_ref,
)
from tests.pipeline.lowrank.common import uniform as _uniform


@pytest.mark.parametrize("causal", [False, True])
def test_closed_form_gradient_matches_autograd_and_finite_differences(causal):
    b, h, n, d = 1, 2, 13, 3
    q, k, v, g = (_uniform((b, h, n, d), 1.5, i) for i in range(4))
    key_mask = torch.ones(b, n, dtype=torch.bool)
    key_mask[0, -3:] = False
    closed = softmax_attention_grads_ref(q, k, v, g, causal=causal, key_mask=key_mask)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    softmax_attention_ref(*leaves, causal=causal, key_mask=key_mask).backward(g)
    for c, leaf in zip(closed, leaves):
        torch.testing.assert_close(c, leaf.grad, rtol=1e-12, atol=1e-12)
    # central differences of L = <G, Y> along random directions
    for i, t in enumerate((q, k, v)):
        dirn = _uniform(t.shape, 1.0, 10 + i)
        eps = 1e-6

        def loss(x, i=i):
            args = [q, k, v]
            args[i] = x
            return (g * softmax_attention_ref(*args, causal=causal, key_mask=key_mask)).sum().item()

        fd = (loss(t + eps * dirn) - loss(t - eps * dirn)) / (2 * eps)
        assert fd == pytest.approx((closed[i] * dirn).sum().item(), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_factorized_gradient_error_decays_exponentially_with_degree(causal):
    """Notes §1 (d) 3 set-up: n=24, d=3, B=0.9, scale 1/d (here with GQA and padding: measured about 3e-3, 2e-5,
    1e-7, 4e-10 for g = 2, 4, 6, 8; the notes' run gave 7e-4 ... 3e-12 on dX): exponential decay in g."""
    b, hq, hkv, n, d = 2, 4, 2, 24, 3
    q, k, v, g = (
        _uniform((b, hq, n, d), 0.9, 0),
        _uniform((b, hkv, n, d), 0.9, 1),
        _uniform((b, hkv, n, d), 0.9, 2),
        _uniform((b, hq, n, d), 1.0, 3),
    )
    key_mask = torch.ones(b, n, dtype=torch.bool)
    key_mask[1, -5:] = False
    ref = softmax_attention_grads_ref(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), g, scale=1 / d, causal=causal, key_mask=key_mask
    )
    ref = (ref[0], ref[1].unflatten(1, (hkv, 2)).sum(2), ref[2].unflatten(1, (hkv, 2)).sum(2))  # GQA: sum each group
    errs = []
    for deg in (2, 4, 6, 8):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        lowrank_attention(*leaves, degree=deg, scale=1 / d, causal=causal, key_mask=key_mask, chunk=5).backward(g)
        errs.append(max((leaf.grad - r).abs().max().item() for leaf, r in zip(leaves, ref)))
    assert errs[0] < 1e-2 and errs[-1] < 1e-8
    assert all(b2 < a / 30 for a, b2 in itertools.pairwise(errs))


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_never_forms_an_n_by_n_matrix(causal):
    n, chunk = 301, 16
    q, k, v = (_uniform((1, 2, n, 4), 0.5, i).requires_grad_() for i in range(3))
    with _Shapes() as rec:
        lowrank_attention(q, k, v, degree=3, causal=causal, chunk=chunk).sum().backward()
    assert rec.shapes
    big = [s for s in rec.shapes if sum(x >= n for x in s) >= 2]  # two axes as long as the sequence
    assert not big, big[:5]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_gradients_for_wq_wk_wv_wo_and_input(causal, residual):
    b, n, c, h = 2, 19, 8, 2
    x = _uniform((b, n, c), 0.7, 0)
    ws = [_uniform((c, c), 0.5, i) for i in (1, 2, 3, 4)]
    g = _uniform((b, n, c), 1.0, 5)
    leaves = [t.clone().requires_grad_() for t in (x, *ws)]
    out = attention_layer(*leaves, heads=h, causal=causal, residual=residual)
    out.backward(g)
    fast_out, grads = attention_layer_grads(x, *ws, g, heads=h, degree=9, causal=causal, residual=residual, chunk=4)
    torch.testing.assert_close(fast_out, out.detach(), rtol=1e-8, atol=1e-9)
    for got, leaf in zip((grads.dx, grads.dw_q, grads.dw_k, grads.dw_v, grads.dw_o), leaves):
        assert (got - leaf.grad).abs().max().item() <= 1e-8 * leaf.grad.abs().max().item()


def test_multi_layer_model_with_residuals_and_layernorm():
    """Notes §1 (d) 4: 3 layers, multi-head, causal; the almost-linear gradient vs exact autograd, every parameter."""
    torch.manual_seed(0)
    model = CausalTransformer(16, 4, 3, qk_bound=0.5).double()
    x = _uniform((2, 41, 16), 1.0, 0)
    target = _uniform((2, 41, 16), 1.0, 1)

    def grads(kernel, degree=4):
        model.zero_grad()
        ((model(x, kernel=kernel, degree=degree, chunk=8) - target) ** 2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = grads("exact")
    torch.testing.assert_close(grads("sdpa"), exact, rtol=1e-10, atol=1e-12)
    errs = [((grads("lowrank", g) - exact).norm() / exact.norm()).item() for g in (2, 4, 6)]
    # beta <= 0.5: Taylor bound 2e-4, 6e-6 ... per kernel entry; the gradient error falls >10x per two degrees
    assert errs[0] < 5e-3 and errs[2] < 1e-6 and errs[1] < errs[0] / 10 and errs[2] < errs[1] / 10


def test_bounded_entries_cap_every_logit():
    torch.manual_seed(1)
    model = CausalTransformer(16, 4, 1, qk_bound=0.5).double()
    x = _uniform((1, 30, 16), 5.0, 2)  # large inputs: the bound must hold regardless
    seen = []
    orig = model._attend

    def spy(q, k, v, kernel, degree, chunk):
        qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        seen.append((0.5 * qn @ kn.transpose(-1, -2)).abs().max().item())
        return orig(q, k, v, kernel, degree, chunk)

    model._attend = spy
    model(x)
    assert seen and max(seen) <= 0.5 + 1e-12


def test_input_errors():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="multiple"):
        lowrank_attention(q, torch.zeros(1, 3, 5, 4), torch.zeros(1, 3, 5, 4), degree=2)
    with pytest.raises(ValueError, match="Nq == Nk"):
        lowrank_attention(q, torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4), degree=2)
    with pytest.raises(ValueError, match="qk_bound"):
        CausalTransformer(8, 2, 1, qk_bound=0.0)
    assert math.isfinite(float(lowrank_attention(q, q, q, degree=0).sum()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bounded_hf_decoder_caps_logits_and_runs_on_the_fast_gradient(tiny_models, family):
    """bound_attention_: |logit| <= beta by construction; the polynomial kernel at the certified degree gives the
    exact bounded model's gradient within the certified error, with and without padding."""
    from pipeline.lowrank.bounded import bound_attention_, bounded_degree
    from pipeline.models import load_model

    exact, fast = (load_model(tiny_models[family]).model.double() for _ in range(2))
    assert bound_attention_(exact, beta=0.5) == 2
    deg = bounded_degree(0.5, 1e-6)
    assert bound_attention_(fast, beta=0.5, degree=deg) == 2
    ids = torch.randint(5, 40, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: a causal-with-padding mask reaches the kernel
    grads = []
    for m in (exact, fast):
        m.zero_grad()
        out = m(input_ids=ids, attention_mask=mask).logits
        (out * mask[..., None]).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-5
    with pytest.raises(ValueError, match="beta"):
        bound_attention_(exact, beta=0.0)


def test_left_padded_causal_rows_are_zero_not_nan():
    q, k, v = (_uniform((1, 2, 9, 4), 0.5, i).requires_grad_() for i in range(3))
    key_mask = torch.tensor([[False, False, False] + [True] * 6])
    y = lowrank_attention(q, k, v, degree=4, causal=True, key_mask=key_mask, chunk=4)
    assert torch.equal(y[:, :, :3], torch.zeros_like(y[:, :, :3]))
    torch.testing.assert_close(
        y[:, :, 3:], softmax_attention_ref(q, k, v, causal=True, key_mask=key_mask)[:, :, 3:], rtol=0, atol=1e-4
    )
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
