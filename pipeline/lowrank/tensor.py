"""Tensor (3-way) attention: dense O(n^3) reference, closed-form gradient, factorized O(n k d^2) forward / backward.

Source: "Tensor Attention Training: Provably Efficient Learning of Higher-order Transformers" (arXiv 2405.16411;
definition from Alman–Song 2023 "How to Capture Higher-order Correlations?"), as reconstructed in the paper
arXiv 2405.16411.

Shapes: (..., n, d) for Q, K1, K2, V1, V2 (any leading batch / head dims). With s the scale (default 1/d, the
notes' normalization; the papers' exact scale is unconfirmed, so it is a parameter):

    S[l, i, j] = s sum_t Q[l, t] K1[i, t] K2[j, t]           (n x n x n logits)
    f[l]       = softmax over (i, j) of S[l]                  (causal: only i <= l and j <= l)
    Y[l]       = sum_{i, j} f[l, i, j] (V1[i] o V2[j])        (o: elementwise)

Fast path: with U1 = phi(c Q), U2 = phi(c K1), U3 = phi(c K2), c = s^(1/3) and phi the degree-g features with
weights (1/alpha!)^(1/3), exp(S[l, i, j]) ~ sum_alpha U1[l, a] U2[i, a] U3[j, a] (relative error <= eps_g of
the Taylor bound with beta >= max |S|, i.e. beta ~ s d B^3 for entries <= B). Then

    Dt = U1 ((U2^T 1) o (U3^T 1)),    Y = Dt^-1 U1 ((U2^T V1) o (U3^T V2))

and the backward (arXiv 2405.16411) uses only (k x d x d) sums. **Causal variant**: the mask (i <= l, j <= l) is a
product of two prefix conditions, so the sums become prefix sums of U2 (.) V1 and U3 (.) V2 (each n x k d);
its backward is autograd through those prefix sums (still O(n k d) memory and time, no n^2 tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dense import masked_softmax, softmax_logit_grad
from .features import PolyFeatures
from .ops import rowwise_kron

__all__ = [
    "TensorAttention",
    "export_tensor_attention",
    "tensor_attention",
    "tensor_attention_grads_ref",
    "tensor_attention_ref",
]


def _scale(d: int, scale: float | None) -> float:
    s = 1.0 / d if scale is None else float(scale)
    if s <= 0:
        raise ValueError(f"scale must be > 0, got {s}")
    return s


def _dense_f(q: Tensor, k1: Tensor, k2: Tensor, s: float, causal: bool) -> Tensor:
    """(..., n, n, n) attention weights f[l, i, j] (float64)."""
    logits = s * torch.einsum("...lt,...it,...jt->...lij", q, k1, k2)
    keep = None
    if causal:
        idx = torch.arange(q.shape[-2], device=q.device)
        keep = (idx[None, :, None] <= idx[:, None, None]) & (idx[None, None, :] <= idx[:, None, None])  # (l, i, j)
    return masked_softmax(logits, keep, weight_dims=2)


def tensor_attention_ref(
    q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor, *, scale: float | None = None, causal: bool = False
) -> Tensor:
    """Dense float64 oracle, O(n^3 d) time and O(n^3) memory: (..., n, d) x 5 -> (..., n, d) float64."""
    q, k1, k2, v1, v2 = (t.double() for t in (q, k1, k2, v1, v2))
    f = _dense_f(q, k1, k2, _scale(q.shape[-1], scale), causal)
    return torch.einsum("...lij,...it,...jt->...lt", f, v1, v2)


def tensor_attention_grads_ref(
    q: Tensor,
    k1: Tensor,
    k2: Tensor,
    v1: Tensor,
    v2: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> tuple[Tensor, ...]:
    """Closed-form dense gradients of <G, Y> (arXiv 2405.16411, dense reference): (dQ, dK1, dK2, dV1, dV2), float64.

    P[l, i, j] = f[l, i, j] (G[l] . (V1[i] o V2[j]) - r[l]), r = rowsum(G o Y);
    dQ = s sum_ij P K1[i] o K2[j]; dK1[i] = s sum_lj P Q[l] o K2[j]; dV1[i] = sum_lj f G[l] o V2[j]; symmetric for 2.
    """
    q, k1, k2, v1, v2, g = (t.double() for t in (q, k1, k2, v1, v2, g))
    s = _scale(q.shape[-1], scale)
    f = _dense_f(q, k1, k2, s, causal)
    y = torch.einsum("...lij,...it,...jt->...lt", f, v1, v2)
    gv = torch.einsum("...lt,...it,...jt->...lij", g, v1, v2)  # dL/df
    p = softmax_logit_grad(f, gv, g, y)  # dL/dS
    dq = s * torch.einsum("...lij,...it,...jt->...lt", p, k1, k2)
    dk1 = s * torch.einsum("...lij,...lt,...jt->...it", p, q, k2)
    dk2 = s * torch.einsum("...lij,...lt,...it->...jt", p, q, k1)
    dv1 = torch.einsum("...lij,...lt,...jt->...it", f, g, v2)
    dv2 = torch.einsum("...lij,...lt,...it->...jt", f, g, v1)
    return dq, dk1, dk2, dv1, dv2


def _features(q: Tensor, k1: Tensor, k2: Tensor, s: float, degree: int) -> tuple[Tensor, Tensor, Tensor]:
    feats = PolyFeatures(q.shape[-1], degree, power=1.0 / 3.0)
    c = s ** (1.0 / 3.0)
    return feats(q * c), feats(k1 * c), feats(k2 * c)  # (..., n, k) each


def _gram3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """sum_i a_i (x) b_i (x) c_i: (..., n, ka), (..., n, kb), (..., n, kc) -> (..., ka, kb, kc)."""
    return (rowwise_kron(a, b).transpose(-1, -2) @ c).unflatten(-2, (a.shape[-1], b.shape[-1]))


def _apply3(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """out_i = sum_{x, y} a_ix b_iy t_xyz: (..., n, ka), (..., n, kb), (..., ka, kb, kc) -> (..., n, kc)."""
    at = (a @ t.flatten(-2)).unflatten(-1, (t.shape[-2], t.shape[-1]))  # (..., n, kb, kc)
    return (at * b.unsqueeze(-1)).sum(-2)


def _fast_forward(q, k1, k2, v1, v2, s, degree, causal):
    u1, u2, u3 = _features(q, k1, k2, s, degree)
    if causal:
        # prefix sums over i <= l and j <= l, separately: (..., n, k) and (..., n, k, d)
        c2, c3 = u2.cumsum(-2), u3.cumsum(-2)
        p2 = (u2.unsqueeze(-1) * v1.unsqueeze(-2)).cumsum(-3)
        p3 = (u3.unsqueeze(-1) * v2.unsqueeze(-2)).cumsum(-3)
        den = (u1 * c2 * c3).sum(-1, keepdim=True)  # (..., n, 1)
        num = (u1.unsqueeze(-1) * p2 * p3).sum(-2)  # (..., n, d)
        return num / den, den
    den = u1 @ (u2.sum(-2) * u3.sum(-2)).unsqueeze(-1)  # (..., n, 1)
    num = u1 @ ((u2.transpose(-1, -2) @ v1) * (u3.transpose(-1, -2) @ v2))  # (k x d) o (k x d)
    return num / den, den


class _TensorAttnFn(torch.autograd.Function):
    """Non-causal tensor attention with the factorized backward of arXiv 2405.16411."""

    @staticmethod
    def forward(ctx, q, k1, k2, v1, v2, s, degree):
        y, den = _fast_forward(q, k1, k2, v1, v2, s, degree, False)
        ctx.save_for_backward(q, k1, k2, v1, v2, y, den)
        ctx.cfg = (s, degree)
        return y

    @staticmethod
    def backward(ctx, g):
        q, k1, k2, v1, v2, y, den = ctx.saved_tensors
        s, degree = ctx.cfg
        u1, u2, u3 = _features(q, k1, k2, s, degree)
        f1 = u1 / den  # F = Dt^-1 U1: (..., n, k)
        r = (g * y).sum(-1, keepdim=True)  # (..., n, 1)
        l0 = f1 * r  # Dt^-1 diag(r) U1
        t = lambda a: a.transpose(-1, -2)  # noqa: E731
        u2k1, u3k2 = t(u2) @ k1, t(u3) @ k2  # (..., k, d)
        u2v1, u3v2 = t(u2) @ v1, t(u3) @ v2
        m2, m3 = _gram3(u2, v1, k1), _gram3(u3, v2, k2)  # (..., k, d, d): sum_i U2 V1 K1
        n1 = _gram3(f1, g, q)  # sum_l F G Q
        dq = s * (_apply3(f1, g, m2 * m3) - l0 @ (u2k1 * u3k2))
        l0q = t(l0) @ q  # (..., k, d)
        dk1 = s * (_apply3(u2, v1, n1 * m3) - u2 @ (l0q * u3k2))
        dk2 = s * (_apply3(u3, v2, n1 * m2) - u3 @ (l0q * u2k1))
        fg = t(f1) @ g  # F^T G: (..., k, d)
        dv1 = u2 @ (fg * u3v2)
        dv2 = u3 @ (fg * u2v1)
        return dq, dk1, dk2, dv1, dv2, None, None


def tensor_attention(
    q: Tensor,
    k1: Tensor,
    k2: Tensor,
    v1: Tensor,
    v2: Tensor,
    *,
    degree: int,
    scale: float | None = None,
    causal: bool = False,
) -> Tensor:
    """Tensor attention by degree-``degree`` polynomial features, never forming an n^2 or n^3 tensor.

    Args:
        q, k1, k2, v1, v2: (..., n, d), one floating dtype.
        degree: Taylor degree g (k = C(d + g, g) features).
        scale: logit scale s > 0 (default 1/d).
        causal: query l sees pairs (i, j) with i <= l and j <= l.

    Returns:
        (..., n, d). Differentiable: non-causal by the closed-form factorized backward, causal by autograd
        through the prefix sums; both O(n k d^2) time.

    Raises:
        ValueError: mismatched shapes / dtypes, degree < 0, scale <= 0.
    """
    ts = (q, k1, k2, v1, v2)
    if any(t.shape != q.shape for t in ts) or q.dim() < 2:
        raise ValueError(f"q, k1, k2, v1, v2 must share one shape (..., n, d), got {[tuple(t.shape) for t in ts]}")
    if any(t.dtype != q.dtype for t in ts) or not q.is_floating_point():
        raise ValueError("q, k1, k2, v1, v2 must share one floating dtype")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    s = _scale(q.shape[-1], scale)
    if causal:
        return _fast_forward(q, k1, k2, v1, v2, s, int(degree), True)[0]
    return _TensorAttnFn.apply(q, k1, k2, v1, v2, s, int(degree))


class TensorAttention(nn.Module):
    """:func:`tensor_attention` as a module (exportable to ONNX: gathers, products, MatMul, CumSum only).

    Args:
        degree: Taylor degree g; scale: logit scale (default 1/d); causal: prefix-sum variant.
    """

    def __init__(self, degree: int, *, scale: float | None = None, causal: bool = False) -> None:
        super().__init__()
        self.degree, self.scale, self.causal = int(degree), scale, bool(causal)

    def forward(self, q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor) -> Tensor:
        s = _scale(q.shape[-1], self.scale)
        return _fast_forward(q, k1, k2, v1, v2, s, self.degree, self.causal)[0]

    def extra_repr(self) -> str:
        return f"degree={self.degree}, scale={self.scale}, causal={self.causal}"


def export_tensor_attention(module: TensorAttention, path, *, d: int, opset: int = 18, dynamo: bool = True):
    """Export :class:`TensorAttention` to ONNX with dynamic batch and sequence axes (inputs q, k1, k2, v1, v2 of
    shape (batch, n, d), output y), written atomically (temp file + rename; an existing symlink is refused).

    Args:
        module: the module to export; path: the .onnx file to write; d: head dim (fixed in the graph).
        opset: ONNX opset; dynamo: the torch.export-based exporter (edgepipe's default) or the TorchScript one.

    Returns:
        The written ``Path``.

    Raises:
        ValueError: ``path`` is a symlink.
    """
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path}: refusing to write through a symlink")
    names = ["q", "k1", "k2", "v1", "v2"]
    example = tuple(torch.rand(2, 5, d) * 0.5 for _ in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if dynamo:
            batch, n = torch.export.Dim("batch"), torch.export.Dim("n")
            prog = torch.onnx.export(
                module,
                example,
                input_names=names,
                output_names=["y"],
                opset_version=opset,
                dynamic_shapes=tuple({0: batch, 1: n} for _ in names),
                dynamo=True,
                verbose=False,
            )
            assert prog is not None  # f=None: the exporter returns the program
            prog.save(tmp)
        else:
            torch.onnx.export(
                module,
                example,
                tmp,
                input_names=names,
                output_names=["y"],
                opset_version=opset,
                dynamic_axes={nm: {0: "batch", 1: "n"} for nm in names},
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
