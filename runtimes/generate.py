"""Greedy generation with an ONNX Runtime KV-cache session, and its PyTorch twin.

The two functions implement the same loop so their token ids can be compared
exactly (the decoder parity check):

1. prefill: the whole prompt with an empty past ``(B, kv, 0, hd)``;
2. decode: one token per step, feeding ``present.{i}.*`` back as
   ``past_key_values.{i}.*`` and growing the attention mask by one column.

No early stop on EOS: both always produce ``max_new_tokens`` tokens, so the
outputs have a fixed shape ``(B, S + max_new_tokens)``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

    from exporters.onnx import ExportResult
    from pipeline.models import LoadedModel

__all__ = ["greedy_generate_ort", "greedy_generate_torch"]

logger = logging.getLogger(__name__)


def _check_prompt(input_ids: np.ndarray, attention_mask: np.ndarray | None, max_new_tokens: int) -> np.ndarray:
    """Validate the prompt; returns the int64 ``(B, S)`` attention mask (all ones by default)."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 1, got shape {input_ids.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if attention_mask is None:
        return np.ones(input_ids.shape, dtype=np.int64)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    return attention_mask.astype(np.int64)


def _positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a (left-padded) mask ``(B, T)``: count of real tokens so far, pads at 0."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def greedy_generate_ort(
    session: onnxruntime.InferenceSession,
    result: ExportResult,
    input_ids: np.ndarray,
    max_new_tokens: int,
    *,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy decoding with an exported causal LM.

    Args:
        session: an ORT session over ``result.path``.
        result: the export (names and cache geometry). With ``with_past`` the
            cache is used; without, every step re-runs the full sequence.
        input_ids: ``(B, S)`` int prompt ids.
        max_new_tokens: tokens to append per row.
        attention_mask: optional ``(B, S)`` 0/1 mask for left-padded prompts.

    Returns:
        ``(B, S + max_new_tokens)`` int64 ids: the prompt followed by the generated tokens.
    """
    if not result.is_causal_lm:
        raise ValueError(f"greedy generation needs a text-generation export, got task {result.task!r}")
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = _check_prompt(ids, attention_mask, max_new_tokens)
    batch = ids.shape[0]
    out = ids
    if max_new_tokens == 0:
        return out
    wants_pos = "position_ids" in result.input_names
    if not result.with_past:
        for _ in range(max_new_tokens):
            feeds = {"input_ids": out, "attention_mask": mask}
            if wants_pos:
                feeds["position_ids"] = _positions(mask)
            logits = session.run(["logits"], feeds)[0]  # (B, T, V)
            nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1)
            out = np.concatenate([out, nxt], axis=1)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        return out

    past_shape = (batch, result.num_kv_heads, 0, result.head_dim)  # empty cache for the prefill
    past = {n: np.zeros(past_shape, dtype=np.float32) for n in result.past_names}
    present_names = [n.replace("past_key_values.", "present.", 1) for n in result.past_names]
    step_ids = ids
    pos = _positions(mask)
    for step in range(max_new_tokens):
        feeds = {"input_ids": step_ids, "attention_mask": mask, **past}
        if wants_pos:
            feeds["position_ids"] = pos
        logits, *presents = session.run(["logits", *present_names], feeds)
        nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]  # (B, 1) greedy pick
        out = np.concatenate([out, nxt], axis=1)
        # next step: one new token; cache grows by the step's length
        past = dict(zip(result.past_names, presents))
        step_ids = nxt
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logger.debug("ort step %d: cache length %d", step, presents[0].shape[2] if presents else 0)
    return out


def greedy_generate_torch(
    loaded: LoadedModel,
    input_ids: np.ndarray,
    max_new_tokens: int,
    *,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy decoding in PyTorch with the model's own ``DynamicCache``: the parity reference.

    Args:
        loaded: a text-generation :class:`~pipeline.models.LoadedModel`.
        input_ids: ``(B, S)`` int prompt ids.
        max_new_tokens: tokens to append per row.
        attention_mask: optional ``(B, S)`` 0/1 mask for left-padded prompts.

    Returns:
        ``(B, S + max_new_tokens)`` int64 ids.
    """
    import torch
    from transformers import DynamicCache

    if not loaded.is_causal_lm:
        raise ValueError(f"greedy generation needs a text-generation model, got task {loaded.task!r}")
    ids = np.asarray(input_ids, dtype=np.int64)
    mask_np = _check_prompt(ids, attention_mask, max_new_tokens)
    out = torch.from_numpy(ids)
    mask = torch.from_numpy(mask_np)
    pos = torch.from_numpy(_positions(mask_np))
    step_ids = out
    cache = DynamicCache()
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            res = loaded.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            cache = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            step_ids = nxt
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return out.numpy().astype(np.int64)
