"""Multi-head attention layers and a multi-layer causal transformer on the almost-linear gradient.

Source: arXiv 2408.13233 (gradients for W_Q, W_K, W_V and the input; residual; multi-head; several layers)
(several layers with residual connections and LayerNorm). Between attention layers the other modules
(LayerNorm, MLP, residual adds) are linear in N, so autograd handles them; attention's backward is the only
quadratic part, and :func:`~pipeline.lowrank.attention.lowrank_attention` replaces it.

Shapes: B batch, N tokens, C model width, H heads, D = C / H head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .attention import lowrank_attention_backward, lowrank_attention_forward, softmax_attention_ref
from .ops import DEFAULT_CHUNK

__all__ = ["KERNEL_CHOICES", "AttentionGrads", "CausalTransformer", "attention_layer", "attention_layer_grads"]

KERNEL_CHOICES = ("exact", "sdpa", "lowrank")


def _split(t: Tensor, heads: int) -> Tensor:
    """(B, N, H D) -> (B, H, N, D)."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H D)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention_layer(
    x: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor, *, heads: int, causal: bool, residual: bool = True
) -> Tensor:
    """Exact multi-head attention layer (dense float64-capable reference): x + concat_h(softmax(Q_h K_h^T / sqrt(D)) V_h) W_O.

    x: (B, N, C); w_q, w_k, w_v: (C, H D); w_o: (H D, C) -> (B, N, C).
    """
    q, k, v = _split(x @ w_q, heads), _split(x @ w_k, heads), _split(x @ w_v, heads)
    y = softmax_attention_ref(q, k, v, causal=causal).to(x.dtype)
    out = _merge(y) @ w_o
    return x + out if residual else out


@dataclass(frozen=True)
class AttentionGrads:
    """Gradients of a multi-head attention layer: dx (B, N, C), dw_q / dw_k / dw_v (C, H D), dw_o (H D, C)."""

    dx: Tensor
    dw_q: Tensor
    dw_k: Tensor
    dw_v: Tensor
    dw_o: Tensor


def attention_layer_grads(
    x: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    w_o: Tensor,
    g_out: Tensor,
    *,
    heads: int,
    degree: int,
    causal: bool,
    residual: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, AttentionGrads]:
    """Forward and factorized backward of :func:`attention_layer` with polynomial features, in O(N k D^2 H).

    Args:
        x: (B, N, C) layer input; w_*: as :func:`attention_layer`; g_out: (B, N, C) = dL/d(output).
        heads: H; degree: Taylor degree g; causal: prefix sums; residual: output = x + attention.

    Returns:
        (output (B, N, C), :class:`AttentionGrads`). Per head h (arXiv 2408.13233):
        dW_Q = X^T dQ, dW_K = X^T dK, dW_V = X^T f^T G_h, dX = dQ W_Q^T + dK W_K^T + dV W_V^T (+ g_out).
    """
    scale = 1.0 / math.sqrt(w_q.shape[1] // heads)
    q, k, v = _split(x @ w_q, heads), _split(x @ w_k, heads), _split(x @ w_v, heads)  # (B, H, N, D)
    y, den = lowrank_attention_forward(q, k, v, degree=degree, scale=scale, causal=causal, chunk=chunk)
    y_flat = _merge(y)  # (B, N, H D)
    out = y_flat @ w_o + (x if residual else 0)
    gy = _split(g_out @ w_o.T, heads)  # (B, H, N, D): G_h = G W_O^T [block h]
    dq, dk, dv = lowrank_attention_backward(q, k, v, y, den, gy, degree=degree, scale=scale, causal=causal, chunk=chunk)
    dq, dk, dv = _merge(dq), _merge(dk), _merge(dv)  # (B, N, H D)
    flat = x.reshape(-1, x.shape[-1])
    dx = dq @ w_q.T + dk @ w_k.T + dv @ w_v.T + (g_out if residual else 0)
    return out, AttentionGrads(
        dx=dx,
        dw_q=flat.T @ dq.reshape(-1, dq.shape[-1]),
        dw_k=flat.T @ dk.reshape(-1, dk.shape[-1]),
        dw_v=flat.T @ dv.reshape(-1, dv.shape[-1]),
        dw_o=y_flat.reshape(-1, y_flat.shape[-1]).T @ g_out.reshape(-1, g_out.shape[-1]),
    )


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))


class CausalTransformer(nn.Module):
    """A pre-LayerNorm causal transformer (x + Attn(LN(x)); x + MLP(LN(x))) whose attention kernel is chosen per call.

    Kernels (``KERNEL_CHOICES``): "exact" (dense softmax, autograd through the N x N matrices: the textbook
    exact gradient), "sdpa" (torch's fused exact kernel), "lowrank" (polynomial features, factorized backward).
    ``qk_bound`` caps the attention entries: q and k are L2-normalized per head and the logit scale is
    ``qk_bound`` (so every |logit| <= qk_bound): the bounded-entry option of issue 13.

    Args:
        width: C; heads: H; layers: number of blocks; mlp: hidden width of the MLP (default 4 C).
        qk_bound: None (ordinary scaled dot-product attention) or beta > 0.
    """

    def __init__(
        self, width: int, heads: int, layers: int, *, mlp: int | None = None, qk_bound: float | None = None
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        if qk_bound is not None and qk_bound <= 0:
            raise ValueError(f"qk_bound must be > 0, got {qk_bound}")
        self.width, self.heads, self.qk_bound = width, heads, qk_bound
        self.blocks = nn.ModuleList(_Block(width, heads, mlp or 4 * width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, kernel: str, degree: int, chunk: int) -> Tensor:
        d = q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        if self.qk_bound is not None:
            q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
            scale = float(self.qk_bound)
        if kernel == "exact":
            n = q.shape[-2]
            s = (q @ k.transpose(-1, -2)) * scale
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            return torch.softmax(s, dim=-1) @ v
        if kernel == "sdpa":
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        from .attention import lowrank_attention

        return lowrank_attention(q, k, v, degree=degree, scale=scale, causal=True, chunk=chunk)

    def forward(
        self,
        x: Tensor,
        *,
        kernel: Literal["exact", "sdpa", "lowrank"] = "exact",
        degree: int = 4,
        chunk: int = DEFAULT_CHUNK,
    ) -> Tensor:
        """x (B, N, C) -> (B, N, C)."""
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
        for blk in self.blocks:
            assert isinstance(blk, _Block)
            q, k, v = blk.qkv(blk.ln1(x)).chunk(3, dim=-1)
            y = self._attend(_split(q, self.heads), _split(k, self.heads), _split(v, self.heads), kernel, degree, chunk)
            x = x + blk.proj(_merge(y))
            x = x + blk.mlp(blk.ln2(x))
        return self.ln_f(x)
