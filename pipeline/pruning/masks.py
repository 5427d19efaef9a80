"""Keep-mask builders on score tensors (higher score = keep) and zero counting.

All builders are deterministic: ties are broken by a *stable* sort, so among equal scores the entry with
the lower (flattened / column) index is pruned first. Masks are ``torch.bool`` with True = keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

__all__ = [
    "allowed_positions",
    "apply_mask_",
    "binarize_scores",
    "count_zeros",
    "nm_mask",
    "num_pruned",
    "unstructured_mask",
]


def num_pruned(size: int, sparsity: float) -> int:
    """Entries removed from ``size`` at ``sparsity``: ``floor(sparsity * size)`` (the Wanda repo's ``int(...)``)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    # The small epsilon guards against 0.3 * 10 = 2.9999999999999996 rounding down to 2.
    return math.floor(sparsity * size + 1e-9)


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Keep the highest scores, removing exactly ``floor(sparsity * count)`` entries.

    Args:
        scores: (out, in) importance scores; higher = more important.
        sparsity: fraction removed, in [0, 1).
        per_row: True compares within each output row (Wanda), False over the whole matrix (magnitude baseline).

    Returns:
        (out, in) bool keep mask.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # contiguous even for strided views
    if per_row:
        k = num_pruned(scores.shape[1], sparsity)
        if k:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # (out, k): lowest k per row
            keep.scatter_(1, idx, False)
    else:
        k = num_pruned(scores.numel(), sparsity)
        if k:
            idx = torch.sort(scores.flatten(), stable=True).indices[:k]
            keep.view(-1)[idx] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep mask along the input dimension: at most ``n`` kept in every ``m`` consecutive columns.

    When ``in % m != 0`` the trailing partial group of ``r`` columns keeps ``ceil(n * r / m)`` of them,
    i.e. the same density rounded up (a partial group is never pruned more than a full one).

    Args:
        scores: (out, in) importance scores.
        n: kept per group, 0 < n < m.
        m: group length.

    Returns:
        (out, in) bool keep mask.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (out, in), got shape {tuple(scores.shape)}")
    if not (m >= 1 and 0 < n <= m):
        raise ValueError(f"n:m needs 0 < n <= m, got n={n!r}, m={m!r}")
    out_f, in_f = scores.shape
    full = in_f // m * m
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if full:
        g = scores[:, :full].reshape(out_f, full // m, m)  # (out, groups, m)
        # descending stable sort: among ties the lower column is kept, the higher pruned
        top = torch.sort(g, dim=2, descending=True, stable=True).indices[:, :, :n]
        kg = torch.zeros_like(g, dtype=torch.bool).scatter_(2, top, True)
        keep[:, :full] = kg.reshape(out_f, full)
    r = in_f - full
    if r:
        n_tail = math.ceil(n * r / m)
        top = torch.sort(scores[:, full:], dim=1, descending=True, stable=True).indices[:, :n_tail]
        keep[:, full:] = torch.zeros((out_f, r), dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    return keep


@torch.no_grad()
def apply_mask_(linear_weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero ``linear_weight`` in place where ``mask`` is False; returns the same tensor."""
    if linear_weight.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(linear_weight.shape)}")
    linear_weight.mul_(mask.to(linear_weight.dtype))
    return linear_weight


def count_zeros(
    model: torch.nn.Module, names: Iterable[str] | Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """Count exact zeros in named weights.

    Args:
        model: the model that owns the parameters.
        names: parameter names (``"encoder.layer.0.attention.self.query.weight"``) or a mapping
            ``name -> tensor`` (e.g. the (out, in) views of fused GPT-2 slices from the adapter).

    Returns:
        ``{name: (zeros, numel)}``.
    """
    if isinstance(names, Mapping):
        tensors = dict(names)
    else:
        names = list(names)
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"unknown parameter names {missing!r}")
        tensors = {n: params[n] for n in names}
    return {n: (int((t == 0).sum().item()), t.numel()) for n, t in tensors.items()}


def allowed_positions(
    n: int, *, causal: bool, pad_mask: torch.Tensor | None = None, batch: int = 1, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query, key) pairs enter the softmax, and which query rows enter the loss.

    Args:
        n: sequence length.
        causal: True adds the lower-triangular constraint j <= i.
        pad_mask: (B, n) bool, True = real token, or None (all real).
        batch: B when ``pad_mask`` is None.
        device: device of the result.

    Returns:
        ``allowed`` (B, n, n) bool and ``row_valid`` (B, n) bool. Rows of padded queries allow every key so the
        softmax stays finite; they are dropped from the loss through ``row_valid``.
    """
    if pad_mask is None:
        pad_mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    allowed = pad_mask[:, None, :].expand(-1, n, -1)  # (B, n_q, n_k): padded keys never attended
    if causal:
        tril = torch.ones(n, n, dtype=torch.bool, device=pad_mask.device).tril()
        allowed = allowed & tril
    # Padded query rows (or a causal row with no real key yet, e.g. left padding) get all keys: finite, ignored.
    empty = ~allowed.any(-1, keepdim=True) | ~pad_mask[:, :, None]
    allowed = allowed | empty
    return allowed, pad_mask


def binarize_scores(
    scores: torch.Tensor, sparsity: float, *, granularity: Literal["matrix", "row"] = "matrix", n: int = 0, m: int = 0
) -> torch.Tensor:
    """Keep the highest scores; bool keep-mask with exactly ``floor(sparsity·count)`` zeros (or the n:m pattern).

    Delegates to ``nm_mask`` / ``unstructured_mask`` so every pruner in the project breaks ties and rounds alike.

    Args:
        scores: (rows, cols) importance, higher = keep.
        sparsity: fraction to remove, in [0, 1) (ignored for n:m).
        granularity: "matrix" (one global threshold) or "row" (per output row, Wanda-style).
        n, m: if m > 0, keep n of every m consecutive columns per row (project convention, as SparseGPT's n:m).

    Returns:
        bool tensor like ``scores``, True = kept.
    """
    if m > 0:
        return nm_mask(scores, n, m)
    if granularity not in ("matrix", "row"):
        raise ValueError(f"granularity must be 'matrix' or 'row', got {granularity!r}")
    return unstructured_mask(scores, sparsity, per_row=granularity == "row")
