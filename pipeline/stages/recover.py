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
    loss: Optional[Literal["hidden_mse", "cosine", "kl_logits"]] = Field(None, description="omitted = cosine for encoders, kl_logits for LMs")
    keep_masks: bool = Field(True, description="weights pruned to exactly zero stay zero")


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
    loss = cfg.loss or ("kl_logits" if art.task in ("text-generation", "fill-mask") else "cosine")
    res = recover_(student.model, teacher.model, batches, steps=cfg.steps, lr=cfg.lr, loss=loss, keep_masks=cfg.keep_masks, heldout=held, seed=ctx.run.seed)
    out_dir = ctx.subdir("model")
    save_model(student, out_dir)
    ctx.metrics.update({"steps": res.steps, "seconds": res.seconds, "loss_first": res.loss_first, "loss_last": res.loss_last,
                        "heldout_before": res.heldout_before, "heldout_after": res.heldout_after, "loss": loss})
    return art.replace(model_dir=ctx.ref(out_dir), torch_changes={**dict(art.torch_changes), "recover": {"steps": res.steps}})
