"""prune: remove weights from the PyTorch model (magnitude / Wanda / SparseGPT / attention-approximation),
unstructured, N:M or structured (physically smaller), and save it for the next stage."""

from __future__ import annotations

import dataclasses
import warnings

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.pruning.config import PruneConfig as _PruneOptions
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_from_artifact, text_sets

__all__ = ["PruneConfig", "run_prune", "PatternGivesNoSpeedup"]


class PatternGivesNoSpeedup(UserWarning):
    """The chosen sparsity pattern will not make some target faster (only smaller, if anything)."""


class PruneConfig(_PruneOptions, StageConfig):
    kind = "prune"
    works_on = "torch"

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


@register_stage(PruneConfig, version=3)
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
    calib, heldout = text_sets(ctx)
    c = ctx.run.calibration
    n_cal = min(cfg.calibration_samples, len(calib))
    batches = encode(loaded, calib[:n_cal], max_length=min(cfg.calibration_seq_len, c.max_length), batch_size=c.batch_size)
    evals = encode(loaded, heldout, max_length=c.max_length, batch_size=c.batch_size)
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"prune ({cfg.method})", unit="layer", disable=not ctx.progress, leave=False)

    def progress(what: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(what)
        bar.n = done
        bar.refresh()

    try:
        res = prune_model(loaded.model, cfg, batches, eval_batches=evals, progress=progress)
    finally:
        bar.close()
    out_dir = ctx.subdir("model")
    save_model(dataclasses.replace(loaded, model=res.model), out_dir)
    metrics = dict(res.metrics)
    if msg:
        metrics["warning"] = msg
    ctx.metrics.update(metrics)
    changes = {**dict(art.torch_changes), "prune": {"method": cfg.method, "pattern": cfg.pattern, "sparsity": cfg.sparsity}}
    return art.replace(model_dir=ctx.ref(out_dir), torch_changes=changes)
