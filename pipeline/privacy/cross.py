"""Private context as encoder output that a decoder cross-attends to: DP cross-attention from the release.

Provider side: the encoder runs over the private context once; each decoder layer's cross-attention keys and
values are its key/value projections of that encoder output, per head (H, n, d) (:func:`cross_kv`), or the
provider brings them precomputed (the ``layers.{l}.key`` / ``layers.{l}.value`` tensors ``private_context``
reads). :func:`pipeline.privacy.release.noisy_layer_sums` releases S̃ = Σᵢ φ(Pᵀkᵢ)[vᵢᵀ, 1] + N(0, σ²) per
layer and head, all noise drawn once. Device side: :class:`DPCrossAttention` replaces one cross-attention
layer. For decoder states h (B, N, C): q = W_q h per head, then the same feature map, one matmul for numerator
and denominator, public guard and division as the prefix form (:func:`pipeline.privacy.model.dp_context_part`),
then W_o over the heads. A cross-attention layer attends to the context only, so its softmax has no self part
to combine; the output is the DP estimate of softmax(scale·q Kᵀ) V itself.

Source: arXiv 2407.14717 (Liang, Shi, Song, Zhou, "Differential Privacy of Cross-Attention with Provable Guarantee",
arXiv 2407.14717: the setting is exactly cross-attention over a private K/V set). Guarantee: as the prefix form,
(ε, δ)-DP of everything that ships for replacing one context row (one encoder position's key/value in every
replaced layer and head) under the public bounds, which clipping enforces. An encoder mixes positions, so one
context *token* moves every row: per-token privacy follows only through group privacy over the n rows, or
where the provider releases per-row features it computed without mixing (stated in the report).

Scope: module level. The loader does not accept encoder-decoder families (BART, T5) yet, so there is no YAML
path; :class:`DPCrossAttention` takes a BART-style layer (``q_proj``, ``out_proj``, ``num_heads``) or plain
linear maps, and :func:`export_dp_cross_attention` writes it as an ONNX model carrying only S̃ (and P).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.loaded import HFModule
from pipeline.privacy.model import DPPrefix, dp_context_part, register_release_buffers

__all__ = ["DPCrossAttention", "cross_kv", "exact_cross_attention", "export_dp_cross_attention"]


def _heads(attn: nn.Module) -> int:
    h = getattr(attn, "num_heads", None) or getattr(getattr(attn, "config", None), "num_attention_heads", None)
    if not h:
        raise ValueError(f"{type(attn).__name__}: no num_heads")
    return int(h)


@torch.no_grad()
def cross_kv(attn: HFModule, encoder_out: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Provider side: a BART-style cross-attention's keys and values of the encoder output.

    Args:
        attn: module with ``k_proj``, ``v_proj`` (nn.Linear) and ``num_heads``.
        encoder_out: (n, C) or (1, n, C) encoder output over the private context.

    Returns:
        (K (H, n, d), V (H, n, d)) float64: never written anywhere by edgepipe.
    """
    e = encoder_out.reshape(-1, encoder_out.shape[-1])  # (n, C)
    h = _heads(attn)
    k, v = attn.k_proj(e), attn.v_proj(e)  # (n, H d)
    n = e.shape[0]
    split = lambda t: t.view(n, h, -1).transpose(0, 1).double().numpy()  # noqa: E731  (H, n, d)
    return split(k), split(v)


def exact_cross_attention(attn: HFModule, hidden: Tensor, K: np.ndarray, V: np.ndarray, scale: float) -> Tensor:
    """The float64 reference: W_o concat_h softmax(scale · q_h K_hᵀ) V_h for decoder states ``hidden`` (B, N, C)
    and the raw context keys / values K, V (H, n, d). Provider side (it needs the raw context)."""
    h = _heads(attn)
    q = nn.functional.linear(hidden.double(), attn.q_proj.weight.double(), _double(attn.q_proj.bias))  # (B, N, H d)
    B, N, _ = q.shape
    q = q.view(B, N, h, -1).transpose(1, 2)  # (B, H, N, d)
    k, v = torch.from_numpy(K), torch.from_numpy(V)  # (H, n, d)
    w = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)  # (B, H, N, n)
    y = (w @ v).transpose(1, 2).reshape(B, N, -1)  # (B, N, H d)
    return nn.functional.linear(y, attn.out_proj.weight.double(), _double(attn.out_proj.bias))


def _double(b: Tensor | None) -> Tensor | None:
    return None if b is None else b.double()


class DPCrossAttention(nn.Module):
    """One cross-attention layer computed from a DP release instead of the encoder's keys and values.

    Args:
        release: the released state (``DPPrefix``: n, degree, scale, bounds, per-layer S̃ (H_kv, r, d_v + 1)
            and optional projection P (H_kv, d, p)).
        layer: which layer of ``release`` this module reads.
        q_proj, out_proj: the layer's query and output maps (C -> H d, H d -> C); shared, not copied.
        num_heads: query heads H (a multiple of the release's KV heads).

    ``forward(hidden_states (B, N, C), key_value_states=None, **kwargs) -> ((B, N, C), None)``: the call
    convention of a BART decoder's ``encoder_attn``, so it can replace one; ``key_value_states`` (the encoder
    output) is ignored: the raw context is not needed, and not present, on the device.

    Raises:
        ValueError: the release has no sums for ``layer``, or its feature count does not match.
    """

    def __init__(self, release: DPPrefix, layer: int, *, q_proj: nn.Module, out_proj: nn.Module, num_heads: int):
        super().__init__()
        if layer not in release.sums:
            raise ValueError(f"the release has no sums for layer {layer} (it has {sorted(release.sums)})")
        if num_heads % release.sums[layer].shape[0]:
            raise ValueError(f"{num_heads} query heads are not a multiple of {release.sums[layer].shape[0]} KV heads")
        self.q_proj, self.out_proj, self.num_heads = q_proj, out_proj, int(num_heads)
        register_release_buffers(self, release, layer, self.num_heads)
        self._st = {
            "n": float(release.n),
            "scale": float(release.scale),
            "key_bound": float(release.key_bound),
            "value_bound": float(release.value_bound),
        }

    @classmethod
    def from_bart(cls, attn: HFModule, release: DPPrefix, layer: int) -> DPCrossAttention:
        """From a BART-style cross-attention module (``q_proj``, ``out_proj``, ``num_heads``, ``scaling``)."""
        scaling = getattr(attn, "scaling", None)
        if scaling is not None and not math.isclose(float(scaling), release.scale, rel_tol=1e-6):
            raise ValueError(f"the release's scale {release.scale:g} is not the layer's softmax scaling {scaling:g}")
        return cls(release, layer, q_proj=attn.q_proj, out_proj=attn.out_proj, num_heads=_heads(attn))

    def forward(self, hidden_states: Tensor, key_value_states: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        B, N, _ = hidden_states.shape
        q = self.q_proj(hidden_states).float().view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, d)
        ctx, _ = dp_context_part(self, q, self._st)  # (B, H, N, d_v)
        out = self.out_proj(ctx.transpose(1, 2).reshape(B, N, -1).to(hidden_states.dtype))  # (B, N, C)
        return out, None


class _Exportable(nn.Module):
    def __init__(self, inner: DPCrossAttention) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.inner(hidden_states)[0]


def export_dp_cross_attention(
    module: DPCrossAttention, path, *, width: int, opset: int = 18, dynamo: bool = True
) -> Path:
    """Export :class:`DPCrossAttention` to ONNX: input ``hidden_states`` (batch, n, width) with dynamic batch and
    length, output ``attention_output``; written atomically (temp file + rename; a symlink at ``path`` is refused).
    The graph's initializers are the layer's weights, S̃ and P: no raw context.

    Raises:
        ValueError: ``path`` is a symlink.
    """
    import os
    import tempfile

    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path}: refusing to write through a symlink")
    wrapped = _Exportable(module).eval()
    example = (torch.rand(2, 5, width),)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        kw: dict[str, Any] = {
            "input_names": ["hidden_states"],
            "output_names": ["attention_output"],
            "opset_version": opset,
        }
        if dynamo:
            dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("n")},)
            prog = torch.onnx.export(wrapped, example, dynamic_shapes=dims, dynamo=True, verbose=False, **kw)
            assert prog is not None  # dynamo=True returns the program
            prog.save(tmp)
        else:
            axes = {"hidden_states": {0: "batch", 1: "n"}, "attention_output": {0: "batch", 1: "n"}}
            torch.onnx.export(wrapped, example, tmp, dynamic_axes=axes, dynamo=False, **kw)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
