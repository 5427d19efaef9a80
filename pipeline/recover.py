"""Recover a pruned model's fidelity by knowledge distillation from its dense teacher.

After pruning (unstructured zeros or structurally removed heads / FFN channels), a short distillation run on
calibration text pulls the student's outputs back toward the dense teacher's. The run is bounded
(``steps``) and CPU-friendly: small batches, teacher targets cached when they fit a memory budget.

Losses (``loss=``):

- ``"hidden_mse"`` (encoders, default for models without causal-LM logits): token-level MSE of the last
  hidden state over real (unmasked) tokens, divided by the teacher's mean square so the term is scale-free,
  plus ``1 - cos`` of the mean-pooled sentence embeddings.
- ``"cosine"`` (encoders): ``1 - cos`` of the mean-pooled embeddings only (exactly what retrieval uses).
- ``"kl_logits"`` (causal LMs, default when the model is a causal LM): ``T^2 * KL(p_teacher || p_student)``
  of temperature-``T`` softened next-token distributions, averaged over real tokens (Hinton et al. 2015).

Structured students keep the teacher's hidden size (only heads / FFN widths shrink), so every loss compares
tensors of equal shape; a mismatch raises a ``ValueError``.

``keep_masks=True`` records which weight-matrix entries (parameters with ndim >= 2) are exactly zero at the
start and multiplies them back to zero after each optimizer step, so unstructured sparsity survives
training. 1-D parameters (biases, LayerNorm) are not masked: they are often zero-initialised, not pruned.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from pipeline.loaded import HFModule

__all__ = ["LossKind", "RecoverResult", "default_loss", "heldout_metrics", "is_causal_lm", "recover_"]

logger = logging.getLogger(__name__)

LossKind = Literal["hidden_mse", "cosine", "kl_logits"]
_LOSSES: tuple[str, ...] = ("hidden_mse", "cosine", "kl_logits")
# Teacher targets are cached across steps (each batch is revisited steps/len(batches) times) while they fit.
_TEACHER_CACHE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class RecoverResult:
    """What a ``recover_`` run did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time of the training loop (held-out evaluation excluded).
        loss_first: distillation loss at the first step.
        loss_last: mean loss over the last ``min(10, steps)`` steps (a single step is noisy).
        heldout_before: held-out metrics before training (``{}`` without held-out batches).
        heldout_after: the same metrics after training.
        loss: the loss that was used.
        masked_params: number of weight tensors whose zeros were kept.
    """

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    heldout_before: dict[str, float]
    heldout_after: dict[str, float]
    loss: str = "hidden_mse"
    masked_params: int = 0
    losses: tuple[float, ...] = field(default=(), repr=False)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True when ``model`` is a Hugging Face causal-LM head model (GPT2LMHeadModel, LlamaForCausalLM, ...).

    Decided by transformers' own causal-LM registry (or ``config.is_decoder``), not by name matching.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return True
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_decoder", False)) and hasattr(model, "get_output_embeddings")


def default_loss(teacher: torch.nn.Module) -> LossKind:
    """The loss used when none is given: ``"kl_logits"`` for causal LMs, ``"hidden_mse"`` for encoders (token-level
    targets generalise better than the pooled cosine alone: MiniLM structured 50 %, 0.927 vs 0.923 at 400 steps)."""
    return "kl_logits" if is_causal_lm(teacher) else "hidden_mse"


def _accepted_keys(model: torch.nn.Module) -> set[str] | None:
    """Names ``model.forward`` accepts, or None when it takes ``**kwargs`` (accept everything)."""
    params = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _feeds(batch: Mapping[str, Any], keys: set[str] | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Batch tensors the model accepts, moved to its device (e.g. drop token_type_ids for Llama)."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and (keys is None or k in keys)}


def _mask_of(batch: Mapping[str, Any]) -> torch.Tensor:
    """(B, T) float mask of real tokens; all ones when the batch has no attention_mask."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return (torch.ones_like(ids) if mask is None else mask).to(torch.float32)


def _outputs_and_layers(
    model: torch.nn.Module, feeds: dict[str, torch.Tensor], causal: bool, attentions: bool = False
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(main output as :func:`_outputs`, hidden states entering each block after the embeddings (B, T, H) each,
    attention probabilities of every block (B, heads, T, T) each when ``attentions``, else ())."""
    out = model(**feeds, output_hidden_states=True, **({"output_attentions": True} if attentions else {}))
    hidden = out["hidden_states"] if isinstance(out, Mapping) else None
    if not hidden:
        raise ValueError(f"{type(model).__name__} returned no hidden_states: layer distillation needs them")
    if causal:
        main = out["logits"]
    else:
        main = out.get("last_hidden_state")
        main = hidden[-1] if main is None else main
    atts = tuple(out.get("attentions") or ()) if attentions else ()
    if attentions and not atts:
        raise ValueError(f"{type(model).__name__} returned no attentions: attention distillation needs them")
    # hidden[0] is the embedding output (unchanged by pruning); hidden[-1] is covered by the main loss
    return main, tuple(hidden[1:-1]), atts


def _attention_loss(s_atts: Sequence[torch.Tensor], t_atts: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of KL(A_teacher || A_student) per real query row, averaged over heads and rows.

    Attention distillation as in MiniLM (Wang et al. 2020): each head's attention distribution is matched.
    Blocks whose head count differs (heads removed by structured pruning) cannot be matched head by head and
    are skipped; with no matchable block the term is 0.
    """
    rows = mask[:, None, :]  # (B, 1, T) real query rows
    terms = []
    for s, t in zip(s_atts, t_atts):
        if s.shape != t.shape:
            continue
        # (B, H, T, T): padded keys have probability ~0 in both; clamp keeps log finite there
        kl = (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1)  # (B, H, T)
        terms.append((kl * rows).sum() / (rows.sum() * s.shape[1]).clamp_min(1.0))
    return torch.stack(terms).mean() if terms else mask.new_zeros(())


def _mapped(t_items: Sequence[torch.Tensor], layer_map: Sequence[int] | None, n_student: int) -> list[torch.Tensor]:
    """The teacher's per-block tensors that student blocks ``0..n_student-1`` learn from: ``t_items[layer_map[i]]``
    (depth-pruned student), or the same index when no map is given."""
    if layer_map is None:
        return list(t_items)
    return [t_items[layer_map[i]] for i in range(n_student)]


def _layers_loss(
    s_layers: Sequence[torch.Tensor],
    t_layers: Sequence[torch.Tensor],
    mask: torch.Tensor,
    layer_map: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean over intermediate blocks of the masked token MSE, each normalised by the teacher's mean square.

    ``layer_map[i]`` is the teacher block whose output student block ``i`` is matched to (depth pruning);
    ``None`` pairs blocks one to one and needs equal depth.
    """
    if layer_map is None and len(s_layers) != len(t_layers):
        raise ValueError(
            f"student has {len(s_layers) + 1} blocks, teacher {len(t_layers) + 1}: layer distillation needs equal"
            " depth or a layer map"
        )
    t_layers = _mapped(t_layers, layer_map, len(s_layers))
    if not t_layers:  # a one-block model: the main loss already covers its only block
        return mask.new_zeros(())
    m = mask.unsqueeze(-1)  # (B, T, 1)
    n = mask.sum().clamp_min(1.0) * t_layers[0].shape[-1]
    terms = [(((s - t) ** 2) * m).sum() / ((t**2) * m).sum().clamp_min(1e-12 * n) for s, t in zip(s_layers, t_layers)]
    return torch.stack(terms).mean()


def _lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at ``step`` (1-based): constant, or linear warm-up + cosine decay."""
    if schedule == "constant":
        return 1.0
    if step <= warmup:
        return step / max(warmup, 1)
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _outputs(model: torch.nn.Module, feeds: dict[str, torch.Tensor], causal: bool) -> torch.Tensor:
    """Logits (B, T, V) for causal LMs, else the last hidden state (B, T, H)."""
    if causal:
        out = model(**feeds)
        return out["logits"] if isinstance(out, Mapping) else out[0]
    out = model(**feeds, output_hidden_states=True)
    if isinstance(out, Mapping):
        if out.get("last_hidden_state") is not None:
            return out["last_hidden_state"]
        if out.get("hidden_states") is not None:
            return out["hidden_states"][-1]
        raise ValueError(f"{type(model).__name__} returned neither last_hidden_state nor hidden_states")
    return out[0]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) x (B, T) -> (B, H): average over real tokens only (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _distill_loss(
    kind: str, s_out: torch.Tensor, t_out: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Scalar loss between student and teacher outputs of equal shape (B, T, H|V); mask is (B, T)."""
    if s_out.shape != t_out.shape:
        raise ValueError(
            f"student output {tuple(s_out.shape)} != teacher output {tuple(t_out.shape)}: recover needs the"
            " same hidden size / vocabulary (structured pruning may only shrink heads and FFN widths)"
        )
    n_tok = mask.sum().clamp_min(1.0)
    if kind == "kl_logits":
        # (B, T, V) -> per-token KL(p_t || p_s) at temperature T; T^2 keeps gradient scale independent of T.
        log_ps = F.log_softmax(s_out.float() / temperature, dim=-1)
        log_pt = F.log_softmax(t_out.float() / temperature, dim=-1)
        kl_tok = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, T)
        return (kl_tok * mask).sum() / n_tok * temperature**2
    cos = F.cosine_similarity(_mean_pool(s_out, mask), _mean_pool(t_out, mask), dim=-1)  # (B,)
    cos_term = (1.0 - cos).mean()
    if kind == "cosine":
        return cos_term
    # hidden_mse: masked token MSE, normalised by the teacher's mean square so the scale is model-free.
    m = mask.unsqueeze(-1)  # (B, T, 1)
    mse = (((s_out - t_out) ** 2) * m).sum() / (n_tok * s_out.shape[-1])
    scale = ((t_out**2) * m).sum() / (n_tok * t_out.shape[-1])
    return mse / scale.clamp_min(1e-12) + cos_term


@torch.no_grad()
def heldout_metrics(
    student: torch.nn.Module, teacher: torch.nn.Module, batches: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Fidelity of ``student`` against ``teacher`` on held-out batches.

    Encoders: cosine of mean-pooled embeddings per passage -> ``cos_mean``, ``cos_min``, ``n``.
    Causal LMs: next-token perplexity of both models (``ppl``, ``teacher_ppl``), the fraction of real
    positions where their top-1 next tokens agree (``top1_agreement``), the mean per-token
    ``KL(p_teacher || p_student)`` at temperature 1 (``kl``, nats) and ``n_tokens``.

    Args:
        student: the (pruned) model.
        teacher: the dense reference model.
        batches: dicts with ``input_ids`` and optionally ``attention_mask`` (B, T).

    Returns:
        The metrics dict (floats).
    """
    causal = is_causal_lm(teacher)
    was = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    device = next(student.parameters()).device
    s_keys, t_keys = _accepted_keys(student), _accepted_keys(teacher)
    cos_all: list[torch.Tensor] = []
    nll_s = nll_t = 0.0
    agree = n_pred = kl_sum = 0.0
    try:
        for batch in batches:
            mask = _mask_of(batch).to(device)
            s_out = _outputs(student, _feeds(batch, s_keys, device), causal).float()
            t_out = _outputs(teacher, _feeds(batch, t_keys, device), causal).float()
            if not causal:
                cos_all.append(F.cosine_similarity(_mean_pool(s_out, mask), _mean_pool(t_out, mask), dim=-1))
                continue
            # Position t predicts token t+1; it counts only when both t and t+1 are real tokens.
            target = batch["input_ids"].to(device)[:, 1:]  # (B, T-1)
            valid = mask[:, 1:] * mask[:, :-1]  # (B, T-1)
            for out, acc in ((s_out, "s"), (t_out, "t")):
                nll = F.cross_entropy(out[:, :-1].transpose(1, 2), target, reduction="none")  # (B, T-1)
                total = float((nll * valid).sum())
                if acc == "s":
                    nll_s += total
                else:
                    nll_t += total
            # KL(p_teacher || p_student) at T=1 over the same positions: fidelity independent of the text.
            log_ps = F.log_softmax(s_out[:, :-1], dim=-1)
            log_pt = F.log_softmax(t_out[:, :-1], dim=-1)
            kl_sum += float(((log_pt.exp() * (log_pt - log_ps)).sum(-1) * valid).sum())
            same = (s_out[:, :-1].argmax(-1) == t_out[:, :-1].argmax(-1)).float()
            agree += float((same * valid).sum())
            n_pred += float(valid.sum())
    finally:
        student.train(was[0])
        teacher.train(was[1])
    if not causal:
        if not cos_all:
            return {}
        cos = torch.cat(cos_all)
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "n": float(cos.numel())}
    if n_pred == 0:
        return {}
    return {
        "ppl": math.exp(nll_s / n_pred),
        "teacher_ppl": math.exp(nll_t / n_pred),
        "top1_agreement": agree / n_pred,
        "kl": kl_sum / n_pred,
        "n_tokens": n_pred,
    }


def _noisy(batch: Mapping[str, Any], p: float, gen: torch.Generator) -> dict[str, Any]:
    """A copy of ``batch`` with a fraction ``p`` of each row's inner real tokens replaced by real tokens of the batch.

    The first and last real positions of a row are kept (BERT's [CLS]/[SEP]); padding is untouched.
    """
    ids = batch["input_ids"]
    real = _mask_of(batch).bool()  # (B, T)
    pos = torch.arange(ids.shape[1])
    first = torch.where(real, pos, ids.shape[1]).amin(1, keepdim=True)  # (B, 1)
    last = torch.where(real, pos, -1).amax(1, keepdim=True)
    inner = real & (pos > first) & (pos < last)
    pool = ids[inner]  # (N,) real inner tokens of the batch
    if pool.numel() == 0:
        return dict(batch)
    hit = inner & (torch.rand(ids.shape, generator=gen) < p)
    new = ids.clone()
    new[hit] = pool[torch.randint(pool.numel(), (int(hit.sum()),), generator=gen)]
    return {**batch, "input_ids": new}


def _zero_masks(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
    """name -> (param, keep) for weight matrices (ndim >= 2) that hold exact zeros; keep is a bool tensor."""
    masks = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim >= 2:
            keep = p.detach() != 0
            if not bool(keep.all()):
                masks[name] = (p, keep)
    return masks


def recover_(
    student: HFModule,
    teacher: HFModule,
    batches: Sequence[Mapping[str, Any]],
    *,
    steps: int = 200,
    lr: float = 1e-4,
    loss: LossKind | None = None,
    temperature: float = 2.0,
    keep_masks: bool = True,
    heldout: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dropout: bool = False,
    max_grad_norm: float | None = 1.0,
    layer_weight: float = 0.0,
    attention_weight: float = 0.0,
    layer_map: Sequence[int] | None = None,
    schedule: Literal["constant", "cosine"] = "constant",
    warmup: int = 0,
    freeze_embeddings: bool = False,
    token_noise: float = 0.0,
    progress: Callable[[int, float], None] | None = None,
) -> RecoverResult:
    """Distill ``teacher`` into ``student`` in place on calibration batches.

    Args:
        student: the pruned model; trained in place (trailing ``_``). Same hidden size / vocab as the teacher.
        teacher: the dense model; frozen and run in eval mode.
        batches: calibration batches (``input_ids``, ``attention_mask``, optional ``token_type_ids``), e.g.
            from ``pipeline.data.tokenize_batches``. Visited in a seeded shuffled order, epoch by epoch.
        steps: number of optimizer steps (>= 1).
        lr: AdamW learning rate (> 0); no weight decay (it would fight the teacher target).
        loss: ``"hidden_mse"``, ``"cosine"`` or ``"kl_logits"``; ``None`` picks ``"kl_logits"`` for causal LMs
            (``is_causal_lm(teacher)``) and ``"hidden_mse"`` otherwise.
        temperature: softmax temperature of ``"kl_logits"`` (> 0).
        keep_masks: keep exact zeros of weight matrices at zero (re-applied after every step).
        heldout: batches for ``heldout_metrics`` before and after; ``None`` skips evaluation.
        seed: seeds the batch order and any dropout; the global RNG state is restored afterwards.
        dropout: train with the student's dropout active (``student.train()``); default off, because a few
            hundred steps on a few passages fit better without noise [I: our choice].
        max_grad_norm: gradient-norm clip (``None`` disables).
        layer_weight: weight of an extra term matching every intermediate block's hidden states to the
            teacher's (normalised masked MSE, mean over blocks); 0 = outputs only. Needs equal depth and width.
        attention_weight: weight of an extra term matching every block's attention probabilities head by head
            (KL, :func:`_attention_loss`; blocks whose head count changed are skipped); 0 = off.
        layer_map: for a depth-pruned student (fewer blocks than the teacher): ``layer_map[i]`` is the teacher
            block student block ``i`` came from (``config.edgepipe_layer_map``, :mod:`pipeline.pruning.depth`);
            the layer and attention terms then match student block ``i`` to teacher block ``layer_map[i]``.
        schedule: ``"constant"`` learning rate, or ``"cosine"``: linear warm-up over ``warmup`` steps, then
            cosine decay to 0 at ``steps``.
        warmup: warm-up steps of the cosine schedule.
        freeze_embeddings: leave the input token embeddings (and an LM head tied to them) untouched: pruning
            did not change them, and a vocabulary-sized Adam update per step is most of a small model's step
            time on CPU while a few thousand passages touch only a fraction of the rows.
        token_noise: fraction of each passage's inner real tokens (not the first or last real one, where BERT
            keeps [CLS]/[SEP]) replaced, per step, by tokens drawn from the same batch: new inputs from the same
            text against over-fitting a small distillation set (TinyBERT-style augmentation). Teacher targets
            are then computed every step (no cache). 0 = off.
        progress: called as ``progress(step, loss)`` after each step (step counts from 1).

    Returns:
        A ``RecoverResult`` with losses, timing and the held-out metrics.

    Raises:
        ValueError: bad ``steps``/``lr``/``loss``/``temperature``, empty ``batches``, or output shapes that
            differ between student and teacher.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if loss is not None and loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if not batches:
        raise ValueError("batches is empty: recover needs calibration batches")
    if not layer_weight >= 0:
        raise ValueError(f"layer_weight must be >= 0, got {layer_weight!r}")
    if not attention_weight >= 0:
        raise ValueError(f"attention_weight must be >= 0, got {attention_weight!r}")
    if not 0 <= token_noise < 1:
        raise ValueError(f"token_noise must be in [0, 1), got {token_noise!r}")
    if layer_map is not None:
        layer_map = [int(i) for i in layer_map]
        if any(b <= a for a, b in itertools.pairwise(layer_map)) or (layer_map and layer_map[0] < 0):
            raise ValueError(f"layer_map must be increasing teacher block indices, got {layer_map!r}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not 0 <= warmup < steps or (warmup and schedule == "constant"):
        raise ValueError(f"warmup must be in [0, steps) and needs schedule='cosine', got warmup={warmup!r}")

    causal = is_causal_lm(teacher)
    kind = loss or default_loss(teacher)
    if kind == "kl_logits" and not causal:
        raise ValueError(f"loss='kl_logits' needs a causal LM teacher, got {type(teacher).__name__}")
    if kind != "kl_logits" and causal:
        # Hidden-state losses are fine for decoders too, but _outputs returns logits for them.
        raise ValueError(f"loss={kind!r} is for encoders; use 'kl_logits' for {type(teacher).__name__}")

    device = next(student.parameters()).device
    s_keys, t_keys = _accepted_keys(student), _accepted_keys(teacher)
    before = heldout_metrics(student, teacher, heldout) if heldout else {}

    masks = _zero_masks(student) if keep_masks else {}
    if masks:
        n_zero = sum(int((~k).sum()) for _, k in masks.values())
        logger.info("recover: keeping %d zeros in %d weight tensors", n_zero, len(masks))

    teacher_was, student_was = teacher.training, student.training
    teacher.eval()
    student.train(dropout)
    frozen = {id(student.get_input_embeddings().weight)} if freeze_embeddings else set()
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in frozen]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cache: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
    cache_bytes = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            order: list[int] = []
            for step in range(1, steps + 1):
                if not order:  # new epoch: a fresh seeded permutation of the batches
                    order = torch.randperm(len(batches), generator=gen).tolist()
                i = order.pop()
                batch = batches[i]
                if token_noise > 0:
                    batch = _noisy(batch, token_noise, gen)
                mask = _mask_of(batch).to(device)
                cached = cache.get(i) if token_noise == 0 else None
                extra = layer_weight > 0 or attention_weight > 0
                want_att = attention_weight > 0
                if cached is None:
                    with torch.no_grad():
                        if extra:
                            t_out, t_layers, t_atts = _outputs_and_layers(
                                teacher, _feeds(batch, t_keys, device), causal, want_att
                            )
                        else:
                            t_out, t_layers, t_atts = _outputs(teacher, _feeds(batch, t_keys, device), causal), (), ()
                    cached = (t_out.detach(), tuple(t.detach() for t in t_layers), tuple(a.detach() for a in t_atts))
                    size = sum(t.numel() * t.element_size() for t in (cached[0], *cached[1], *cached[2]))
                    if token_noise == 0 and cache_bytes + size <= _TEACHER_CACHE_BYTES:
                        cache[i] = cached
                        cache_bytes += size
                t_out, t_layers, t_atts = cached
                if extra:
                    s_out, s_layers, s_atts = _outputs_and_layers(
                        student, _feeds(batch, s_keys, device), causal, want_att
                    )
                else:
                    s_out, s_layers, s_atts = _outputs(student, _feeds(batch, s_keys, device), causal), (), ()
                value = _distill_loss(kind, s_out, t_out, mask, temperature)
                if layer_weight > 0:
                    value = value + layer_weight * _layers_loss(s_layers, t_layers, mask, layer_map)
                if attention_weight > 0:
                    t_a = _mapped(t_atts, layer_map, len(s_atts))
                    value = value + attention_weight * _attention_loss(s_atts, t_a, mask)
                if not torch.isfinite(value):
                    raise FloatingPointError(f"recover: non-finite loss {value.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                value.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                for group in opt.param_groups:
                    group["lr"] = lr * _lr_factor(step, steps, schedule, warmup)
                opt.step()
                if masks:
                    with torch.no_grad():
                        for p, keep in masks.values():
                            p.mul_(keep)  # pruned entries back to exactly 0 after the Adam update
                losses.append(value.item())
                if progress is not None:
                    progress(step, losses[-1])
                logger.debug("recover step %d/%d loss %.6f", step, steps, losses[-1])
    finally:
        seconds = time.perf_counter() - t0
        teacher.train(teacher_was)
        student.train(student_was)
        student.zero_grad(set_to_none=True)

    after = heldout_metrics(student, teacher, heldout) if heldout else {}
    tail = losses[-min(10, len(losses)) :]
    result = RecoverResult(
        steps=len(losses),
        seconds=seconds,
        loss_first=losses[0],
        loss_last=sum(tail) / len(tail),
        heldout_before=before,
        heldout_after=after,
        loss=kind,
        masked_params=len(masks),
        losses=tuple(losses),
    )
    logger.info(
        "recover: %d steps in %.1fs, loss %.4g -> %.4g, heldout %s -> %s",
        result.steps,
        seconds,
        result.loss_first,
        result.loss_last,
        before,
        after,
    )
    return result
