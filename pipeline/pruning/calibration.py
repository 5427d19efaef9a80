"""Layer-by-layer calibration capture for the sequential pruning protocol.

Protocol (locuslab/wanda ``lib/prune.py``, IST-DASLab/sparsegpt): run the model once up to the first block and
store its inputs (plus the extra call arguments: attention mask, RoPE cos/sin, ...); then for each block

1. run the block on the stored inputs with forward hooks on its linears: accumulate per-input-feature squared
   norms (Wanda) and, when asked, ``X^T X`` (SparseGPT Hessian) in float64, streaming over batches and counting
   only real (non-padding) tokens; also keep the hidden states entering attention (B, n, d) and the pad mask;
2. prune the block;
3. re-run the block on the same inputs: its (now pruned) outputs are the next block's inputs
   (``sequential=True``), or use the dense outputs from step 1 (``sequential=False``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.pruning.adapters import BlockView

__all__ = [
    "LayerInput",
    "LayerStats",
    "capture_first_block_inputs",
    "collect_block_stats",
    "collect_cross_stats",
    "random_calibration",
    "run_block",
    "tokenize_calibration",
]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the catcher hook to stop the model after the first block's inputs are seen."""


@dataclass
class LayerInput:
    """Inputs of one block for one calibration batch.

    Args:
        hidden: (B, n, d) hidden states entering the block.
        args: positional arguments after ``hidden`` (e.g. BERT's extended attention mask).
        kwargs: keyword arguments of the block call (Llama: ``position_embeddings``, ``attention_mask``...).
        pad_mask: (B, n) bool, True = real token.
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    pad_mask: torch.Tensor


@dataclass
class LayerStats:
    """Calibration statistics of one block, keyed by matrix role.

    Args:
        sq_norms: role -> (in,) float64 ``sum_t x_{t,j}^2`` over real tokens.
        hessians: role -> (in, in) float64 ``(2/N) X^T X`` (only when requested).
        tokens: role -> number of real tokens seen.
        sums: role -> (in,) float64 ``sum_t x_t`` over real tokens (bias terms of structured compensation).
        attn_input: (B, n_max, d) hidden states entering attention, zero-padded across batches.
        attn_pad_mask: (B, n_max) bool, True = real token.
        outputs: dense block outputs per batch (B, n, d) (kept for the non-sequential protocol).
    """

    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    attn_input: torch.Tensor | None = None
    attn_pad_mask: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)


def tokenize_calibration(
    tokenizer: Any, texts: Sequence[str], *, samples: int, seq_len: int, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Tokenize the first ``samples`` non-empty texts into padded batches of at most ``seq_len`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (a pad token is required; GPT-2-style tokenizers reuse EOS).
        texts: calibration passages (one sequence each).
        samples: number of sequences (``PruneConfig.calibration_samples``).
        seq_len: truncation length (``PruneConfig.calibration_seq_len``).
        batch_size: sequences per batch.

    Returns:
        ``[{"input_ids": (B, n), "attention_mask": (B, n), ...}]``, right-padded per batch.
    """
    chosen = [t for t in texts if t.strip()][:samples]
    if len(chosen) < samples:
        raise ValueError(f"need {samples} non-empty calibration texts, got {len(chosen)}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, samples, batch_size):
        enc = tokenizer(
            chosen[i : i + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
        )
        out.append(dict(enc))
    return out


def random_calibration(
    vocab_size: int, *, samples: int, seq_len: int, batch_size: int = 8, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Seeded random token batches (no padding), for models without a tokenizer (tests, smoke runs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, samples, batch_size):
        b = min(batch_size, samples - i)
        ids = torch.randint(0, vocab_size, (b, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _forward_kwargs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    accepted = inspect.signature(model.forward).parameters
    kw: dict[str, Any] = {k: v for k, v in batch.items() if k in accepted}
    if "use_cache" in accepted:
        kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, first: BlockView, batches: Iterable[dict[str, torch.Tensor]]
) -> list[LayerInput]:
    """Run ``model`` on each batch up to ``first.layer`` and return what enters it.

    Args:
        model: HF model in eval mode.
        first: view of block 0.
        batches: tokenized batches ``{"input_ids": (B, n), "attention_mask": (B, n), ...}``.
    """
    seen: list[tuple[tuple, dict]] = []

    def catcher(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        raise _StopForward

    out: list[LayerInput] = []
    handle = first.layer.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for batch in batches:
            seen.clear()
            try:
                model(**_forward_kwargs(model, batch))
            except _StopForward:
                pass  # expected: the catcher stops the forward at block 0
            if not seen:
                raise RuntimeError("the first block was never called; is the adapter pointing at the right module?")
            args, kwargs = seen[0]
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            ids = batch["input_ids"]
            am = batch.get("attention_mask")
            pad = am.bool() if am is not None else torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            out.append(LayerInput(hidden=hidden, args=rest, kwargs=kwargs, pad_mask=pad))
    finally:
        handle.remove()
    return out


@torch.no_grad()
def run_block(block: BlockView, inp: LayerInput) -> torch.Tensor:
    """Call ``block.layer`` on one stored input; returns the (B, n, d) output hidden states."""
    out = block.layer(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_block_stats(
    block: BlockView,
    inputs: Sequence[LayerInput],
    roles: Sequence[str],
    *,
    hessian_roles: Sequence[str] = (),
    keep_attn_input: bool = False,
    keep_outputs: bool = True,
    extra_norm_modules: dict[str, nn.Module] | None = None,
) -> LayerStats:
    """Run ``block`` on ``inputs`` with hooks and accumulate the statistics of its linears.

    Args:
        block: the block to observe (dense, not yet pruned).
        inputs: the block's inputs, one per batch.
        roles: matrix roles whose input squared norms are needed.
        hessian_roles: roles whose ``(2/N) X^T X`` is needed (SparseGPT; attention method).
        keep_attn_input: also store the hidden states entering attention (B, n, d) and the pad mask.
        keep_outputs: store the dense block outputs (needed only by the non-sequential protocol).
        extra_norm_modules: extra ``name -> module`` whose input squared norms are wanted (e.g. for structured
            ranking); stored in ``sq_norms[name]``.

    Returns:
        :class:`LayerStats` (dense outputs included).
    """
    mats = block.matrices()
    # one hook per distinct module: GPT-2's q/k/v share c_attn and therefore one input
    by_module: dict[int, tuple[nn.Module, list[str]]] = {}
    for role in set(roles) | set(hessian_roles):
        mod = mats[role].module
        by_module.setdefault(id(mod), (mod, []))[1].append(role)
    for name, mod in (extra_norm_modules or {}).items():
        by_module.setdefault(id(mod), (mod, []))[1].append(name)
    want_h = set(hessian_roles)
    stats = LayerStats()
    current_pad: list[torch.Tensor] = []  # (B, n) mask of the batch being run
    attn_chunks: list[torch.Tensor] = []

    def make_hook(keys: list[str], is_attn_in: bool):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]  # (B, n, in)
            pad = current_pad[0]
            if is_attn_in and keep_attn_input:
                attn_chunks.append(x.detach().clone())
            xt = x.reshape(-1, x.shape[-1])[pad.reshape(-1)].double()  # (tokens, in): real tokens only
            sq = (xt * xt).sum(0)
            total = xt.sum(0)
            h = xt.t() @ xt if any(k in want_h for k in keys) else None
            for key in keys:
                stats.sq_norms[key] = stats.sq_norms.get(key, 0) + sq
                stats.tokens[key] = stats.tokens.get(key, 0) + xt.shape[0]
                stats.sums[key] = stats.sums.get(key, 0) + total
                if key in want_h:
                    assert h is not None  # computed when any key wants it
                    stats.hessians[key] = stats.hessians.get(key, 0) + h

        return hook

    attn_mod = block.attention_input_module
    handles = []
    if keep_attn_input and id(attn_mod) not in by_module:
        by_module[id(attn_mod)] = (attn_mod, [])
    for key, (mod, keys) in by_module.items():
        handles.append(mod.register_forward_pre_hook(make_hook(keys, key == id(attn_mod))))
    try:
        for inp in inputs:
            current_pad[:] = [inp.pad_mask]
            out = run_block(block, inp)
            if keep_outputs:
                stats.outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    for role in list(stats.hessians):
        stats.hessians[role] = 2.0 * stats.hessians[role] / max(stats.tokens[role], 1)
    if keep_attn_input:
        n_max = max(c.shape[1] for c in attn_chunks)
        X = torch.cat([nn.functional.pad(c, (0, 0, 0, n_max - c.shape[1])) for c in attn_chunks])  # (B, n_max, d)
        P = torch.cat([nn.functional.pad(i.pad_mask, (0, n_max - i.pad_mask.shape[1])) for i in inputs])
        stats.attn_input, stats.attn_pad_mask = X, P.bool()
    return stats


@torch.no_grad()
def collect_cross_stats(
    block: BlockView,
    inputs: Sequence[LayerInput],
    dense_inputs: Sequence[LayerInput],
    roles: Sequence[str],
    *,
    dense_layer: nn.Module | None = None,
    keep_attn_input: bool = False,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Cross moments between what each matrix sees in the pruned and in the dense model.

    Runs ``block`` once on the pruned-model inputs and its dense twin (``dense_layer``, or ``block`` itself while
    it is not pruned yet) once on the dense-model inputs of every batch (same passages, same padding, so tokens
    align) and accumulates, per role,
    ``C = (2/N) sum_t x_t xd_t^T`` (in, in) over real tokens: with ``H = (2/N) sum_t x_t x_t^T`` the weight
    that best maps the pruned inputs to the dense outputs, ``argmin_W' sum_t ||W' x_t - W xd_t||^2``, is
    ``W C^T H^-1`` (error correction toward the dense model instead of toward the pruned model's own inputs).
    ``C`` is returned augmented with a constant input, (in+1, in+1): ``(2/N) sum_t [x_t, 1] [xd_t, 1]^T``, so
    the bias can be corrected too; ``C[:in, :in]`` is the plain moment.

    Args:
        dense_layer: an untouched copy of ``block.layer`` for the dense stream, once ``block`` is partly pruned
            (true-sequential correction inside a block); ``None`` = ``block.layer`` itself (not pruned yet).
        keep_attn_input: also return the dense hidden states entering attention, (B, n_max, d) zero-padded
            like ``LayerStats.attn_input`` (the attention method's dense target).

    Returns:
        (role -> augmented C, the dense block outputs per batch: the next block's dense inputs, dense attention
        inputs or None).
    """
    mats = block.matrices()
    by_module: dict[int, tuple[nn.Module, list[str]]] = {}
    for role in roles:
        mod = mats[role].module
        by_module.setdefault(id(mod), (mod, []))[1].append(role)
    attn_key = id(block.attention_input_module)
    if keep_attn_input and attn_key not in by_module:
        by_module[attn_key] = (block.attention_input_module, [])
    attn_chunks: list[torch.Tensor] = []
    seen: dict[Any, torch.Tensor] = {}  # module id -> (tokens, in+1) inputs of the last run; "attn" -> (B, n, d)
    pad_now: list[torch.Tensor] = []

    def make_hook(key: int):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            xt = x.reshape(-1, x.shape[-1])[pad_now[0].reshape(-1)].double()  # (tokens, in)
            seen[key] = torch.cat([xt, torch.ones(xt.shape[0], 1, dtype=xt.dtype)], dim=1)  # (tokens, in+1)
            if key == attn_key:
                seen["attn"] = x.detach().clone()  # (B, n, d) as it enters attention

        return hook

    handles = [mod.register_forward_pre_hook(make_hook(key)) for key, (mod, _) in by_module.items()]
    if dense_layer is not None:  # the same hooks on the dense copy's corresponding modules (matched by name)
        names = {id(m): n for n, m in block.layer.named_modules()}
        twins = dict(dense_layer.named_modules())
        handles += [twins[names[key]].register_forward_pre_hook(make_hook(key)) for key, (mod, _) in by_module.items()]
    cross: dict[str, torch.Tensor] = {}
    tokens = 0
    dense_out: list[torch.Tensor] = []
    try:
        for inp, dinp in zip(inputs, dense_inputs, strict=True):
            pad_now[:] = [inp.pad_mask]
            run_block(block, inp)
            pruned_x = dict(seen)
            if dense_layer is None:
                dense_out.append(run_block(block, dinp))
            else:
                out = dense_layer(dinp.hidden, *dinp.args, **dinp.kwargs)
                dense_out.append(out[0] if isinstance(out, (tuple, list)) else out)
            if keep_attn_input:
                attn_chunks.append(seen["attn"])
            for key, (_, keys) in by_module.items():
                if not keys:
                    continue
                c = pruned_x[key].t() @ seen[key]  # (in+1, in+1)
                for r in keys:
                    cross[r] = cross.get(r, 0) + c
            tokens += int(inp.pad_mask.sum())
    finally:
        for h in handles:
            h.remove()
    attn = None
    if keep_attn_input:
        n_max = max(c.shape[1] for c in attn_chunks)
        attn = torch.cat([nn.functional.pad(c, (0, 0, 0, n_max - c.shape[1])) for c in attn_chunks])
    return {r: 2.0 * c / max(tokens, 1) for r, c in cross.items()}, dense_out, attn
