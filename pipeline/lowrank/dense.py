"""Dense float64 pieces shared by the attention oracles (matrix and tensor): O(n^2) / O(n^3), references only.

Source: the closed-form softmax gradient of arXiv 2408.13233 (matrix attention) and arXiv 2405.16411 (tensor
attention): both have Y[l] = sum_w f[l, w] X[w] with f[l] = softmax over the weight axes w of S[l], so one formula
gives dL/dS for both.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["masked_softmax", "softmax_logit_grad"]


def masked_softmax(logits: Tensor, keep: Tensor | None, *, weight_dims: int = 1) -> Tensor:
    """Softmax of ``logits`` over its last ``weight_dims`` axes together; entries where ``keep`` is False get 0.

    Args:
        logits: (..., n, *W) scores, W the ``weight_dims`` weight axes (1 for matrix, 2 for tensor attention).
        keep: bool broadcastable to ``logits``, True = attend; None = no mask.

    Returns:
        Weights f of ``logits``' shape, summing to 1 over the weight axes of each row that keeps an entry.
    """
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    # the weight axes flattened to one: a softmax over (i, j) pairs is a softmax over i * n + j
    return torch.softmax(logits.flatten(-weight_dims), dim=-1).view(logits.shape)


def softmax_logit_grad(f: Tensor, df: Tensor, g: Tensor, y: Tensor) -> Tensor:
    """dL/dS through f = softmax(S): P = f o (dL/df - r), r = rowsum(G o Y) (arXiv 2408.13233, 2405.16411).

    Since Y[l] = sum_w f[l, w] X[w], r[l] = G[l] . Y[l] = sum_w f[l, w] dL/df[l, w], the term the softmax's Jacobian
    subtracts; r is taken from G and Y (one (n, d) product) instead of the full (n, *W) one.

    Args:
        f: (..., n, *W) softmax weights; df: dL/df, same shape (masked entries may hold anything finite).
        g: (..., n, d) dL/dY; y: (..., n, d) the forward output.

    Returns:
        P = dL/dS, (..., n, *W), zero wherever f is.
    """
    r = (g * y).sum(-1)  # (..., n)
    r = r.reshape(*r.shape, *([1] * (f.dim() - r.dim())))  # (..., n, 1, ...): broadcast over the weight axes
    return f * (df - r)
