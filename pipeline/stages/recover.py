"""recover: distil the pruned model from the dense one on calibration text for a bounded number of steps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_dense, load_from_artifact, stage_warning, text_sets_and_rest

__all__ = [
    "RecoverConfig",
    "default_steps",
    "distillation_texts",
    "passages_needed",
    "run_recover",
    "teacher_layer_map",
]


class RecoverConfig(StageConfig):
    kind = "recover"
    works_on = "torch"
    steps: int | None = Field(
        None,
        ge=1,
        le=100000,
        description="optimizer steps; omitted = scales with the compression: max(200, 4000 x pruned fraction), 2000 at"
        " 50 % (the measured MiniLM recipe)",
    )
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate (MiniLM structured: 1e-3 > 5e-4 > 2e-3)")
    loss: Literal["hidden_mse", "cosine", "kl_logits"] | None = Field(
        None,
        description="omitted = kl_logits for causal LMs, hidden_mse (token-level last-hidden-state MSE + cosine"
        " of mean-pooled embeddings) for encoders: MiniLM structured 50 %, 400 steps, 0.927 vs 0.923 with cosine only",
    )
    keep_masks: bool = Field(True, description="weights pruned to exactly zero stay zero")
    samples: int | None = Field(
        None,
        ge=1,
        description="distillation passages: the calibration samples first, then passages after the held-out window;"
        " omitted = every passage of the calibration text except the held-out ones",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="passages per step (batched by length: little padding)")
    layer_weight: float = Field(
        10.0,
        ge=0,
        description="weight of matching every intermediate block's hidden states (0 = outputs only);"
        " MiniLM structured 50 %, 400 steps: 1 -> 0.927, 3 -> 0.930, 10 -> 0.934, 30 -> 0.934 held-out cosine",
    )
    attention_weight: float = Field(
        0.0,
        ge=0,
        description="weight of matching every block's attention maps head by head (KL; blocks whose head"
        " count changed are skipped); 0 = off",
    )
    schedule: Literal["constant", "cosine"] = Field("cosine", description="learning-rate schedule")
    warmup: float = Field(0.05, ge=0, lt=1, description="warm-up steps of the cosine schedule, as a fraction of steps")
    freeze_embeddings: bool = Field(True, description="leave the token embeddings (and a tied LM head) as they are")
    token_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of inner tokens replaced per step by tokens of the same batch"
        " (augmentation against over-fitting a small distillation set); 0 = off",
    )
    gradient: Literal["exact", "almost_linear"] = Field(
        "exact",
        description="almost_linear: the student's attention runs on polynomial features with the factorized"
        " backward (pipeline.lowrank, O(n) in the sequence length); needs a bounded-entry model (config.json"
        " edgepipe_bounded_attention) for which verify_gradient's rule applies at the batches' length, refused otherwise",
    )
    kernel_eps: float = Field(
        1e-4, gt=0, lt=1, description="gradient: almost_linear: kernel relative error the degree is chosen for"
    )


def default_steps(pruned: float) -> int:
    """Recover steps for a pruned fraction of the block weights: 200 at most 5 %, 2000 at 50 % ([I] linear in the
    fraction; MiniLM structured 50 %: 200 steps -> 0.635 held-out cosine, 2000 steps -> 0.952)."""
    return max(200, round(4000 * pruned))


def passages_needed(pruned: float) -> int:
    """Distillation passages a pruned fraction needs: 6000 x fraction, at least 200 ([I]; the 0.95 recipe at 50 %
    used 8264 passages, 104 built-in passages gave 0.635)."""
    return max(200, round(6000 * pruned))


def _improved(before: dict, after: dict) -> bool:
    """Encoders: mean embedding cosine to the teacher went up; LMs: KL to the teacher went down."""
    if "cos_mean" in before:
        return after["cos_mean"] >= before["cos_mean"]
    return after["kl"] <= before["kl"]


def distillation_texts(ctx: StageContext, samples: int | None) -> tuple[list[str], list[str]]:
    """(training passages for recover, held-out passages): the calibration passages, then those after the held-out
    window (never the held-out ones), up to ``samples`` (None = all of them)."""
    calib, heldout, rest = text_sets_and_rest(ctx)
    pool = calib + rest
    return (pool if samples is None else pool[:samples]), heldout


def _almost_linear_plan(model, batches, cfg: RecoverConfig) -> dict:
    """The degree for ``gradient: almost_linear``, by verify_gradient's rule: the model's attention is bounded
    (every |logit| <= its cap beta) and the degree for ``kernel_eps`` has k = C(D + g, g) features with
    k <= n / D at the longest batch's n tokens (then the factorized gradient's O(n k D^2) is below O(n^2 D)).

    Raises:
        StageError: one line naming what does not apply (unbounded model, too few tokens, attention maps).
    """
    from pipeline.lowrank.bounded import bounded_beta
    from pipeline.lowrank.certify import head_applicability

    if cfg.attention_weight > 0:
        raise StageError(
            "recover",
            "gradient: almost_linear does not form attention maps; set attention_weight: 0 or gradient: exact",
        )
    try:
        beta = bounded_beta(model.config)
    except ValueError as e:
        raise StageError("recover", f"gradient: almost_linear: {e}") from None
    if beta is None:
        raise StageError(
            "recover",
            "gradient: almost_linear does not apply: the model's attention entries are not bounded (no"
            " edgepipe_bounded_attention in its config.json; pretrained heads are far outside the polynomial regime)",
        )
    conf = model.config
    heads = getattr(conf, "num_attention_heads", None) or getattr(conf, "n_head", None)
    width = getattr(conf, "hidden_size", None) or getattr(conf, "n_embd", None)
    if not (heads and width):
        raise StageError("recover", "gradient: almost_linear: the model config names no head count / hidden width")
    head_dim = getattr(conf, "head_dim", None) or width // heads
    n = max(int(b["input_ids"].shape[1]) for b in batches)
    plan = head_applicability(beta, head_dim, eps=cfg.kernel_eps, max_features=max(1, n // head_dim))
    if not plan.applicable:
        raise StageError(
            "recover",
            f"gradient: almost_linear does not apply: cap beta {beta:g} needs degree {plan.degree} ="
            f" {plan.features} features at head dim {head_dim} for kernel_eps {cfg.kernel_eps:g}, more than"
            f" n / head dim = {n // head_dim} at the longest batch's {n} tokens (raise calibration.max_length,"
            " or use gradient: exact)",
        )
    return {"beta": beta, "degree": plan.degree, "features": plan.features, "head_dim": head_dim, "tokens": n}


def teacher_layer_map(student, teacher) -> list[int] | None:
    """Teacher block of each student block when ``prune`` dropped blocks (``structured_unit: layers``), else None.

    Both maps (``config.edgepipe_layer_map``) name blocks of the original model; the teacher may itself be a
    depth-pruned model, so student block ``i`` pairs with the teacher block that holds the same original block.

    Raises:
        StageError: a student block whose original block the teacher no longer has.
    """
    from pipeline.pruning.depth import layer_map

    s_map, t_map = layer_map(student), layer_map(teacher)
    if s_map == t_map:
        return None
    where = {o: i for i, o in enumerate(t_map)}
    missing = [o for o in s_map if o not in where]
    if missing:
        raise StageError(
            "recover", f"the pruned model keeps original block(s) {missing} that the reference model does not have"
        )
    return [where[o] for o in s_map]


@register_stage(RecoverConfig, version=5)
def run_recover(art: Artifact, cfg: RecoverConfig, ctx: StageContext) -> Artifact:
    """Knowledge distillation (student = current model, teacher = dense), held-out fidelity before/after."""
    from pipeline.models import save_model
    from pipeline.recover import default_loss, recover_

    student = load_from_artifact(art, ctx)
    teacher = load_dense(art)
    train, heldout = distillation_texts(ctx, cfg.samples)
    c = ctx.run.calibration
    prune = art.torch_changes.get("prune") or {}
    pruned = float(prune.get("removed", prune.get("sparsity", 0.0)) or 0.0)
    cfg = cfg.model_copy(update={"steps": cfg.steps or default_steps(pruned)})
    assert cfg.steps is not None  # resolved just above
    need = passages_needed(pruned)
    if pruned > 0 and len(train) < need:
        where = c.file or "the built-in calibration text"
        stage_warning(
            ctx,
            f"recover has {len(train)} distillation passages ({where}) for {pruned:.0%} of the weights pruned;"
            f" about {need} are needed to recover fidelity: set calibration.file to a text file with that many"
            " passages (one per line)",
        )
    # sorted by length, so a batch pads to similar lengths (recover_ visits batches in a seeded random order)
    batches = encode(student, sorted(train, key=len), max_length=c.max_length, batch_size=cfg.batch_size, ctx=ctx)
    held = encode(student, heldout, max_length=c.max_length, batch_size=c.batch_size, ctx=ctx)
    fast = _almost_linear_plan(student.model, batches, cfg) if cfg.gradient == "almost_linear" else None
    if fast is not None:
        from pipeline.lowrank.bounded import set_bounded_degree_

        set_bounded_degree_(student.model, fast["degree"])
        ctx.log.info("recover: almost-linear attention gradient, %s", fast)
    start = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
    loss = cfg.loss or default_loss(teacher.model)
    mapping = teacher_layer_map(student.model, teacher.model)
    ctx.log.info("recover: %d steps on %d passages (%d batches), loss %s", cfg.steps, len(train), len(batches), loss)
    res = recover_(
        student.model,
        teacher.model,
        batches,
        steps=cfg.steps,
        lr=cfg.lr,
        loss=loss,
        keep_masks=cfg.keep_masks,
        heldout=held,
        seed=ctx.run.seed,
        layer_weight=cfg.layer_weight,
        attention_weight=cfg.attention_weight,
        layer_map=mapping,
        schedule=cfg.schedule,
        warmup=int(cfg.warmup * cfg.steps) if cfg.schedule == "cosine" else 0,
        freeze_embeddings=cfg.freeze_embeddings,
        token_noise=cfg.token_noise,
    )
    rolled_back = not _improved(res.heldout_before, res.heldout_after)
    if rolled_back:
        # distillation made held-out fidelity worse (e.g. the student was already very close): keep the input
        student.model.load_state_dict(start)
        ctx.log.warning(
            "recover: held-out fidelity got worse (%s -> %s); kept the un-recovered model",
            res.heldout_before,
            res.heldout_after,
        )
    if fast is not None:
        from pipeline.lowrank.bounded import set_bounded_degree_

        set_bounded_degree_(student.model, None)  # the saved model records only its cap (exact bounded attention)
    out_dir = ctx.subdir("model")
    save_model(student, out_dir)
    ctx.metrics.update(
        {
            "steps": res.steps,
            "seconds": res.seconds,
            "loss_first": res.loss_first,
            "loss_last": res.loss_last,
            "passages": len(train),
            "heldout_before": res.heldout_before,
            "heldout_after": res.heldout_after,
            "loss": res.loss,
            "layer_weight": cfg.layer_weight,
            **({"layer_map": mapping} if mapping is not None else {}),
            "rolled_back": rolled_back,
            "gradient": cfg.gradient,
            **({"almost_linear": fast} if fast is not None else {}),
        }
    )
    return art.replace(
        model_dir=ctx.ref(out_dir), torch_changes={**dict(art.torch_changes), "recover": {"steps": res.steps}}
    )
