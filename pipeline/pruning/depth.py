"""Depth pruning: the structured unit ``layers`` drops whole transformer blocks.

Which blocks go is decided greedily on calibration text, one block per round, against the dense model
(ShortGPT / "The Unreasonable Ineffectiveness of the Deeper Layers" measure block redundancy the same way;
the greedy re-measurement after each drop is our choice [I]):

* ``sensitivity``: the block whose skipping changes the model's final hidden state least
  (``||h - h_dense||^2 / ||h_dense||^2`` over real tokens, (B, T, H) last hidden state of the backbone).
* ``attention``: the attention objective on what the block's output feeds: the mean row KL between the dense
  model's attention probabilities and the reduced model's, over every kept block (each compared with the
  dense block it came from), plus the same KL on the relation map ``softmax(H H^T / sqrt(d))`` of the final
  hidden state, so that the last block is judged too (MiniLM-v2 style self-attention relation [I]).

The model is edited in place: the block list is shortened, ``num_hidden_layers`` (``n_layer`` / ``n_layers``
through the config's attribute map) is updated, per-layer config entries (``pruned_heads``,
``edgepipe_qk_dims``, ``layer_types``) are re-keyed, attention modules get their new ``layer_idx``, and
``config.edgepipe_layer_map`` records, for each kept block, the index of the block it was in the original
model: student block ``i`` distils from teacher block ``edgepipe_layer_map[i]`` in ``recover``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.pruning.adapters import blocks

__all__ = [
    "LAYER_CRITERIA",
    "LAYER_MAP_KEY",
    "drop_layers_",
    "keep_layers_",
    "layer_map",
    "layers_to_drop",
    "output_error",
]

LAYER_MAP_KEY = "edgepipe_layer_map"  # config.json: [original index of kept block 0, of block 1, ...]
LAYER_CRITERIA = ("sensitivity", "attention")

Batch = Mapping[str, torch.Tensor]


def _block_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, the ModuleList holding the transformer blocks)."""
    first = blocks(model)[0].layer
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and mod[0] is first:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, mod
    raise ValueError(f"{type(model).__name__}: no module list holds its transformer blocks")


def layer_map(model: nn.Module) -> list[int]:
    """Original block index of each current block (identity for a model edgepipe has not depth-pruned)."""
    n = len(_block_list(model)[2])
    got = getattr(model.config, LAYER_MAP_KEY, None)
    if got is None:
        return list(range(n))
    got = [int(i) for i in got]
    if len(got) != n or any(b <= a for a, b in itertools.pairwise(got)) or (got and got[0] < 0):
        raise ValueError(f"config {LAYER_MAP_KEY}={got!r} does not describe {n} blocks in increasing order")
    return got


def _check_supported(model: nn.Module) -> None:
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 option: the attention scale depends on the block's position, so a moved block computes differently
        raise ValueError("structured_unit 'layers' cannot drop blocks of a model with scale_attn_by_inverse_layer_idx")


def _rekey(d: Any, keep: Sequence[int], as_str: bool) -> Any:
    if not isinstance(d, Mapping):
        return d
    out = {}
    for new, old in enumerate(keep):
        for key in (old, str(old)):
            if key in d:
                out[str(new) if as_str else new] = d[key]
    return out


def keep_layers_(model: nn.Module, keep: Sequence[int]) -> list[int]:
    """Keep only the blocks at current indices ``keep`` (increasing), update the config; returns the new layer map.

    Raises:
        ValueError: ``keep`` empty, unordered or out of range; or a model whose blocks depend on their position.
    """
    from pipeline.pruning.qk_dims import QK_DIMS_KEY

    _check_supported(model)
    parent, attr, old = _block_list(model)
    n = len(old)
    keep = [int(i) for i in keep]
    if not keep or any(not 0 <= i < n for i in keep) or any(b <= a for a, b in itertools.pairwise(keep)):
        raise ValueError(f"blocks to keep must be increasing indices in [0, {n}), got {keep!r}")
    orig = layer_map(model)
    new_map = [orig[i] for i in keep]
    setattr(parent, attr, nn.ModuleList([old[i] for i in keep]))
    conf: Any = model.config
    conf.num_hidden_layers = len(keep)  # GPT-2 / DistilBERT: attribute_map -> n_layer / n_layers
    if getattr(conf, "pruned_heads", None):
        conf.pruned_heads = _rekey(conf.pruned_heads, keep, as_str=False)
    if getattr(conf, QK_DIMS_KEY, None):
        setattr(conf, QK_DIMS_KEY, _rekey(getattr(conf, QK_DIMS_KEY), keep, as_str=True))
    types = getattr(conf, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        conf.layer_types = [types[i] for i in keep]
    for new_i, layer in enumerate(getattr(parent, attr)):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_i  # KV-cache slot of a decoder block
    setattr(conf, LAYER_MAP_KEY, new_map)
    return new_map


@contextlib.contextmanager
def _only(model: nn.Module, keep: Sequence[int]) -> Iterator[None]:
    """Run the model with only the blocks ``keep`` for the duration (no config record, restored afterwards)."""
    parent, attr, full = _block_list(model)
    conf: Any = model.config
    n_before = conf.num_hidden_layers
    setattr(parent, attr, nn.ModuleList([full[i] for i in keep]))
    conf.num_hidden_layers = len(keep)
    try:
        yield
    finally:
        setattr(parent, attr, full)
        conf.num_hidden_layers = n_before


def _feeds(model: nn.Module, batch: Batch, **kw: Any) -> dict[str, Any]:
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    out: dict[str, Any] = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k in accepted}
    if "use_cache" in accepted:
        out["use_cache"] = False
    return {**out, **kw}


def _mask(batch: Batch) -> torch.Tensor:
    ids = batch["input_ids"]
    m = batch.get("attention_mask")
    return (torch.ones_like(ids) if m is None else m).to(torch.float64)  # (B, T)


def _row_kl(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(sum over real query rows of KL(p || q), number of rows); p, q (B, heads, T, T)."""
    p, q = p.double(), q.double()
    kl = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)  # (B, heads, T)
    rows = mask[:, None, :]
    return float((kl * rows).sum()), float(rows.sum() * p.shape[1])


def _relation(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) softmax(H H^T / sqrt(d)) over real keys; h (B, T, H)."""
    h = h.double()
    s = h @ h.transpose(1, 2) / math.sqrt(h.shape[-1])
    s = s.masked_fill(mask[:, None, :] == 0, float("-inf"))
    return torch.softmax(s, -1)[:, None]


class _Scorer:
    """Scores a candidate set of kept blocks against the dense model's outputs (computed once)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], criterion: str) -> None:
        from pipeline.pruning.metrics import eager_attention

        self.model, self.batches, self.criterion = model, list(batches), criterion
        self.base = getattr(model, "base_model", model)
        self._eager = eager_attention
        self.n = len(_block_list(model)[2])
        self.ref = [self._run(b) for b in self.batches]

    def _run(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """((B, T, H) last hidden state, attention probabilities per block when the criterion needs them)."""
        if self.criterion == "attention":
            with self._eager(self.model):
                out = self.base(**_feeds(self.base, batch, output_attentions=True))
            return out.last_hidden_state, tuple(out.attentions)
        return self.base(**_feeds(self.base, batch)).last_hidden_state, ()

    @torch.no_grad()
    def score(self, keep: Sequence[int]) -> float:
        num = den = 0.0
        with _only(self.model, keep):
            for batch, (h_ref, att_ref) in zip(self.batches, self.ref):
                h, att = self._run(batch)
                mask = _mask(batch)
                if self.criterion == "sensitivity":
                    m = mask[..., None]
                    num += float((((h.double() - h_ref.double()) ** 2) * m).sum())
                    den += float(((h_ref.double() ** 2) * m).sum())
                    continue
                pairs = [(att_ref[orig], a) for orig, a in zip(keep, att) if att_ref[orig].shape == a.shape]
                pairs.append((_relation(h_ref, mask), _relation(h, mask)))
                for p, q in pairs:
                    s, r = _row_kl(p, q, mask)
                    num, den = num + s, den + r
        return num / max(den, 1e-300)


def layers_to_drop(
    model: nn.Module,
    batches: Sequence[Batch],
    n_drop: int,
    criterion: str = "sensitivity",
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Current block indices to drop (greedy, one per round), and each round's scores.

    Args:
        model: a supported HF model (BERT family, GPT-2, Llama family), eval mode.
        batches: calibration batches ``{"input_ids": (B, T), "attention_mask": (B, T)}``.
        n_drop: blocks to drop, in ``[0, num_blocks)``.
        criterion: ``sensitivity`` or ``attention`` (see the module docstring).

    Returns:
        (dropped indices, ascending; ``[{"dropped": i, "scores": {candidate: score}}, ...]`` per round).

    Raises:
        ValueError: unknown criterion, no calibration batches, ``n_drop`` out of range.
    """
    if criterion not in LAYER_CRITERIA:
        raise ValueError(f"layer criterion must be one of {LAYER_CRITERIA}, got {criterion!r}")
    if not batches:
        raise ValueError("structured_unit 'layers' measures block sensitivity on calibration batches; got none")
    scorer = _Scorer(model, batches, criterion)
    if not 0 <= n_drop < scorer.n:
        raise ValueError(f"cannot drop {n_drop} of {scorer.n} blocks (at least one is kept)")
    kept = list(range(scorer.n))
    rounds: list[dict[str, Any]] = []
    for r in range(n_drop):
        scores = {c: scorer.score([i for i in kept if i != c]) for c in kept}
        best = min(kept, key=lambda c: (scores[c], c))
        kept.remove(best)
        rounds.append({"dropped": best, "scores": {str(c): s for c, s in scores.items()}})
        if progress is not None:
            progress("layers", r + 1, n_drop)
    return sorted(set(range(scorer.n)) - set(kept)), rounds


def drop_layers_(
    model: nn.Module,
    batches: Sequence[Batch],
    n_drop: int,
    criterion: str = "sensitivity",
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Choose ``n_drop`` blocks with :func:`layers_to_drop` and remove them in place.

    Returns:
        Report ``{"criterion", "dropped" (original indices), "layer_map" (original index of each kept block),
        "blocks": [before, after], "rounds"}``.
    """
    _check_supported(model)
    n = len(_block_list(model)[2])
    orig = layer_map(model)
    dropped, rounds = layers_to_drop(model, batches, n_drop, criterion, progress)
    new_map = keep_layers_(model, [i for i in range(n) if i not in dropped])
    return {
        "criterion": criterion,
        "dropped": [orig[i] for i in dropped],
        "layer_map": new_map,
        "blocks": [n, n - len(dropped)],
        "rounds": rounds,
    }


@torch.no_grad()
def output_error(dense: nn.Module, pruned: nn.Module, batches: Sequence[Batch]) -> float:
    """Relative error ``||h - h_dense||_F / ||h_dense||_F`` of the final hidden state (B, T, H) over real tokens."""
    num = den = 0.0
    for batch in batches:
        m = _mask(batch)[..., None]
        ref = getattr(dense, "base_model", dense)
        got = getattr(pruned, "base_model", pruned)
        h_ref = ref(**_feeds(ref, batch)).last_hidden_state.double()
        h = got(**_feeds(got, batch)).last_hidden_state.double()
        num += float((((h - h_ref) ** 2) * m).sum())
        den += float(((h_ref**2) * m).sum())
    return math.sqrt(num / max(den, 1e-300))
