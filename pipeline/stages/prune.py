"""prune: remove weights from the PyTorch model (magnitude / Wanda / SparseGPT / attention-approximation),
unstructured, N:M or structured (physically smaller), and save it for the next stage."""

from __future__ import annotations

import dataclasses
import warnings

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.pruning.config import PruneConfig as _PruneOptions
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_from_artifact, text_sets

__all__ = ["PruneConfig", "run_prune", "PatternGivesNoSpeedup"]


class PatternGivesNoSpeedup(UserWarning):
    """The chosen sparsity pattern will not make some target faster (only smaller, if anything)."""


class PruneConfig(_PruneOptions, StageConfig):
    kind = "prune"


@register_stage(PruneConfig, version=3)
def run_prune(art: Artifact, cfg: PruneConfig, ctx: StageContext) -> Artifact:
    """Prune with calibration text (sequential, layer by layer) and record what was removed and what it cost."""
    from pipeline.models import save_model
    from pipeline.pruning.api import prune_model

    slow = [n for n, p in ctx.targets.items() if cfg.pattern not in p.fast_patterns]
    if slow:
        msg = f"pattern '{cfg.pattern}' gives no speedup on target(s) {slow} (their profiles list {sorted({x for n in slow for x in ctx.targets[n].fast_patterns})})"
        if cfg.strict:
            raise StageError("prune", msg + "; set strict: false to prune anyway")
        warnings.warn(msg, PatternGivesNoSpeedup, stacklevel=1)
        ctx.log.warning(msg)
    loaded = load_from_artifact(art, ctx)
    calib, heldout = text_sets(ctx)
    c = ctx.run.calibration
    n_cal = min(cfg.calibration_samples, len(calib))
    batches = encode(loaded, calib[:n_cal], max_length=min(cfg.calibration_seq_len, c.max_length), batch_size=c.batch_size, ctx=ctx,
                     setting="calibration_seq_len" if cfg.calibration_seq_len < c.max_length else "calibration.max_length")
    evals = encode(loaded, heldout, max_length=c.max_length, batch_size=c.batch_size, ctx=ctx)
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
    if slow:
        metrics["warning"] = msg
    ctx.metrics.update(metrics)
    changes = {**dict(art.torch_changes), "prune": {"method": cfg.method, "pattern": cfg.pattern, "sparsity": cfg.sparsity}}
    return art.replace(model_dir=ctx.ref(out_dir), torch_changes=changes)
