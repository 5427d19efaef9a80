"""prune: remove weights from the PyTorch model (magnitude / Wanda / SparseGPT / attention-approximation),
unstructured, N:M or structured (physically smaller), and save it for the next stage."""

from __future__ import annotations

import copy
import dataclasses
import warnings

from pydantic import Field

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.pruning.config import PruneConfig as _PruneOptions
from pipeline.sensitivity.config import PruneSensitivityOptions
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import (
    encode,
    load_from_artifact,
    progress_bar,
    stage_warning,
    text_sets,
    warn_without_validate,
)

__all__ = ["PatternGivesNoSpeedup", "PruneConfig", "run_prune"]


class PatternGivesNoSpeedup(UserWarning):
    """The chosen sparsity pattern will not make some target faster (only smaller, if anything)."""


class PruneConfig(_PruneOptions, StageConfig):
    kind = "prune"
    works_on = "torch"
    sensitivity: PruneSensitivityOptions | None = Field(
        None, description="per-layer report: the dense model with one pruned unit at a time, measured ({} = defaults)"
    )

    def speedup_problem(self, targets) -> str:
        """Targets (name -> profile) this pattern will not speed up, as a message ('' when none)."""
        slow = [n for n, p in targets.items() if self.pattern not in p.fast_patterns]
        if not slow:
            return ""
        return f"pattern '{self.pattern}' gives no speedup on target(s) {slow} (their profiles list {sorted({x for n in slow for x in targets[n].fast_patterns})})"

    def check(self, plan: RunPlan) -> None:
        msg = self.speedup_problem(plan.targets)
        if msg and self.strict:
            raise ValueError(msg + "; set strict: false to prune anyway")


def resolve_structured_defaults(cfg: PruneConfig, loaded) -> tuple[PruneConfig, str]:
    """The structured unit, when omitted, is the best one measured for the model's family.

    BERT family with a method that ranks q/k widths (a registered qk_width_rule: attention, wanda, magnitude): ``qk_dims+ffn``, removing the
    same parameters as ``heads+ffn`` at ``sparsity`` s: q/k width s and FFN ``s * (1 + hidden / intermediate)``
    (MiniLM 50 %: q/k 50 % + FFN 62.5 % recovers to 0.952 held-out cosine vs 0.947 for heads 25 % + FFN 62.5 %,
    benchmarks/RESULTS.md). Decoders and SparseGPT: ``heads+ffn``. Returns the config and a note ('' if unchanged).
    """
    if cfg.pattern != "structured" or "structured_unit" in cfg.model_fields_set:
        return cfg, ""
    if loaded.family != "bert" or cfg.method_spec.qk_width_rule is None or cfg.targets not in ("all", "attention"):
        return cfg, ""
    conf = loaded.model.config
    hidden = int(getattr(conf, "hidden_size", 0) or getattr(conf, "dim", 0))
    inter = int(getattr(conf, "intermediate_size", 0) or getattr(conf, "hidden_dim", 0))
    update: dict = {"structured_unit": "qk_dims+ffn"}
    if cfg.ffn_sparsity is None and hidden and inter:
        # heads+ffn at s removes s * (4 h^2 + 2 h I); q/k width s removes s * 2 h^2, so FFN takes the rest
        update["ffn_sparsity"] = round(min(0.95, cfg.sparsity * (1 + hidden / inter)), 4)
    out = cfg.model_copy(update=update)
    note = (
        f"structured_unit omitted: qk_dims+ffn (best measured for the BERT family), q/k width"
        f" {out.qk_sparsity if out.qk_sparsity is not None else out.sparsity:g}, FFN {out.ffn_sparsity if out.ffn_sparsity is not None else out.sparsity:g}"
    )
    return out, note


@register_stage(PruneConfig, version=4)
def run_prune(art: Artifact, cfg: PruneConfig, ctx: StageContext) -> Artifact:
    """Prune with calibration text (sequential, layer by layer) and record what was removed and what it cost."""
    from pipeline.models import save_model
    from pipeline.pruning.api import prune_model

    msg = cfg.speedup_problem(ctx.targets)
    if msg:
        if cfg.strict:
            raise StageError("prune", msg + "; set strict: false to prune anyway")
        warnings.warn(msg, PatternGivesNoSpeedup, stacklevel=1)
        ctx.log.warning(msg)
    loaded = load_from_artifact(art, ctx)
    cfg, chosen = resolve_structured_defaults(cfg, loaded)
    if chosen:
        ctx.metrics.setdefault("notes", []).append(chosen)
        ctx.log.info(chosen)
    warn_without_validate(ctx, "prune")
    if cfg.pattern == "structured" and "recover" not in [s.kind for s in list(ctx.run.stages)[ctx.index + 1 :]]:
        stage_warning(
            ctx,
            f"structured pruning at {cfg.sparsity:.0%} without a recover stage after it: expect a large fidelity"
            " loss (MiniLM 50 %: held-out cosine 0.84 before recovery, 0.95 after); add '- recover: {}'",
        )
    calib, heldout = text_sets(ctx)
    c = ctx.run.calibration
    n_cal = min(cfg.calibration_samples, len(calib))
    batches = encode(
        loaded,
        calib[:n_cal],
        max_length=min(cfg.calibration_seq_len, c.max_length),
        batch_size=c.batch_size,
        ctx=ctx,
        setting="calibration_seq_len" if cfg.calibration_seq_len < c.max_length else "calibration.max_length",
    )
    evals = encode(loaded, heldout, max_length=c.max_length, batch_size=c.batch_size, ctx=ctx)
    bar = progress_bar(ctx, desc=f"prune ({cfg.method})", unit="layer")

    def progress(what: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(what)
        bar.n = done
        bar.refresh()

    dense_copy = copy.deepcopy(loaded.model) if cfg.sensitivity is not None else None
    try:
        res = prune_model(loaded.model, cfg, batches, eval_batches=evals, progress=progress)
    finally:
        bar.close()
    out_dir = ctx.subdir("model")
    save_model(dataclasses.replace(loaded, model=res.model), out_dir)
    metrics = dict(res.metrics)
    if msg:
        metrics["warning"] = msg
    metrics["structured_unit"] = cfg.structured_unit if cfg.pattern == "structured" else None
    if dense_copy is not None and cfg.sensitivity is not None:
        from pipeline.sensitivity.prune import prune_sensitivity

        metrics["sensitivity"] = prune_sensitivity(
            dense_copy, res.model, loaded, batches, cfg.sensitivity, pattern=cfg.pattern, plot_dir=ctx.dir
        )
    ctx.metrics.update(metrics)
    removed = float((metrics.get("sparsity") or {}).get("overall", cfg.sparsity))
    changes = {
        **dict(art.torch_changes),
        "prune": {"method": cfg.method, "pattern": cfg.pattern, "sparsity": cfg.sparsity, "removed": removed},
    }
    return art.replace(model_dir=ctx.ref(out_dir), torch_changes=changes)
