"""recover: distil the pruned model from the dense one on calibration text for a bounded number of steps."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from pipeline.artifact import Artifact
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_dense, load_from_artifact, text_sets

__all__ = ["RecoverConfig", "run_recover"]


class RecoverConfig(StageConfig):
    kind = "recover"
    steps: int = Field(200, ge=1, le=100000, description="optimizer steps (CPU-friendly: a few hundred)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    loss: Optional[Literal["hidden_mse", "cosine", "kl_logits"]] = Field(None, description="omitted = kl_logits for causal LMs, hidden_mse (token MSE + pooled cosine) otherwise")
    keep_masks: bool = Field(True, description="weights pruned to exactly zero stay zero")


def _improved(before: dict, after: dict) -> bool:
    """Encoders: mean embedding cosine to the teacher went up; LMs: KL to the teacher went down."""
    if "cos_mean" in before:
        return after["cos_mean"] >= before["cos_mean"]
    return after["kl"] <= before["kl"]


@register_stage(RecoverConfig)
def run_recover(art: Artifact, cfg: RecoverConfig, ctx: StageContext) -> Artifact:
    """Knowledge distillation (student = current model, teacher = dense), held-out fidelity before/after."""
    from pipeline.models import save_model
    from pipeline.recover import recover_

    student = load_from_artifact(art, ctx)
    teacher = load_dense(art)
    calib, heldout = text_sets(ctx)
    c = ctx.run.calibration
    batches = encode(student, calib, max_length=c.max_length, batch_size=c.batch_size)
    held = encode(student, heldout, max_length=c.max_length, batch_size=c.batch_size)
    start = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
    res = recover_(student.model, teacher.model, batches, steps=cfg.steps, lr=cfg.lr, loss=cfg.loss, keep_masks=cfg.keep_masks, heldout=held, seed=ctx.run.seed)
    rolled_back = not _improved(res.heldout_before, res.heldout_after)
    if rolled_back:
        # distillation made held-out fidelity worse (e.g. the student was already very close): keep the input
        student.model.load_state_dict(start)
        ctx.log.warning("recover: held-out fidelity got worse (%s -> %s); kept the un-recovered model", res.heldout_before, res.heldout_after)
    out_dir = ctx.subdir("model")
    save_model(student, out_dir)
    ctx.metrics.update({"steps": res.steps, "seconds": res.seconds, "loss_first": res.loss_first, "loss_last": res.loss_last,
                        "heldout_before": res.heldout_before, "heldout_after": res.heldout_after, "loss": res.loss, "rolled_back": rolled_back})
    return art.replace(model_dir=ctx.ref(out_dir), torch_changes={**dict(art.torch_changes), "recover": {"steps": res.steps}})
