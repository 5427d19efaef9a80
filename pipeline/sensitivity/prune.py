"""Per-layer pruning sensitivity: the dense model with one unit replaced by its pruned version, measured.

The prune stage prunes every block (sequentially, as configured). To see what each layer costs, each unit of
the *stage's own result* is put back into an otherwise dense copy, one at a time, and the model output on
calibration passages is compared with the dense model's (:func:`pipeline.sensitivity.quantize.output_fidelity`:
cosine of mean-pooled embeddings, or per-token cosine for logits). Units: one transformer block (its pruned
module swapped in: works for structured pruning, which changes shapes) or one matrix (unstructured / N:M:
the pruned weight copied into the dense matrix). There is no latency column: no ONNX graph exists before export;
the quantize stage's sensitivity report joins its units with ORT's profiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.sensitivity.config import PruneSensitivityOptions

__all__ = ["prune_sensitivity"]


def _module_path(model: Any, module: Any) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("block module not found in the model")


def _set_module(model: Any, path: str, module: Any) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def prune_sensitivity(
    dense: Any,
    pruned: Any,
    loaded: Any,
    batches: Sequence[dict[str, Any]],
    options: PruneSensitivityOptions,
    *,
    pattern: str,
    plot_dir: Path,
) -> dict[str, Any]:
    """Measure each unit's pruning error (dense model with only that unit pruned vs the dense model).

    Args:
        dense: an unpruned copy of the model (modified during the call, restored before it returns).
        pruned: the pruned model (not modified).
        loaded: the ``LoadedModel`` (family, tokenizer) the models belong to; its ``model`` is not used.
        batches: tokenized calibration batches (``input_ids``, ``attention_mask`` [, ``token_type_ids``]).
        options: granularity and number of calibration passages.
        pattern: the prune pattern; ``structured`` is always measured per block.
        plot_dir: folder for ``sensitivity.png``.

    Returns:
        ``{"granularity", "samples", "metric", "rows": [{unit, block, role, params, sensitivity, cos_mean,
        token_cos_min, max_abs_diff}], "plot": "sensitivity.png"}`` (plus ``note_granularity`` when the granularity changed).
    """
    import torch

    from exporters.onnx import torch_reference
    from pipeline.pruning.adapters import blocks
    from pipeline.sensitivity.render import plot_sensitivity
    from pipeline.sensitivity.units import block_roles

    feeds: list[dict[str, np.ndarray]] = []
    for b in batches:
        if sum(int(f["input_ids"].shape[0]) for f in feeds) >= options.samples:
            break
        feeds.append({k: v.detach().cpu().numpy() for k, v in b.items()})
    as_dense = dataclasses.replace(loaded, model=dense)

    def outputs() -> list[np.ndarray]:
        return [next(iter(torch_reference(as_dense, f).values())) for f in feeds]

    output = next(iter(torch_reference(as_dense, feeds[0])))  # logits: per-token cosine; else pooled cosine
    reference = outputs()
    granularity = options.granularity
    note = None
    if granularity == "matmul" and pattern == "structured":
        granularity, note = "block", "structured pruning changes shapes across matrices: measured per block"
    rows: list[dict[str, Any]] = []
    d_views, p_views = blocks(dense), blocks(pruned)
    with torch.no_grad():
        for dv, pv in zip(d_views, p_views):
            if granularity == "block":
                path = _module_path(dense, dv.layer)
                original = dv.layer
                _set_module(dense, path, pv.layer)  # borrowed, not copied: nothing runs backward or edits it
                try:
                    got = outputs()
                finally:
                    _set_module(dense, path, original)
                removed = sum(int((r.weight != 0).sum()) for r in dv.matrices().values()) - sum(
                    int((r.weight != 0).sum()) for r in pv.matrices().values()
                )  # nonzero weights before - after: zeroed (unstructured) or removed (structured)
                rows.append(_row(f"block{dv.index}", dv.index, "block", removed, reference, got, feeds, output))
                continue
            for role, dref in block_roles(dv).items():
                pw = block_roles(pv)[role].weight
                if torch.equal(pw, dref.weight):
                    continue  # not pruned (e.g. targets: ffn leaves q/k/v/o dense)
                saved = dref.weight.clone()
                dref.weight = pw
                try:
                    got = outputs()
                finally:
                    dref.weight = saved
                removed = int((pw == 0).sum()) - int((saved == 0).sum())
                rows.append(_row(f"block{dv.index}.{role}", dv.index, role, removed, reference, got, feeds, output))
    plot_sensitivity(rows, Path(plot_dir) / "sensitivity.png", title="prune: per-unit sensitivity")
    out = {
        "granularity": granularity,
        "samples": sum(int(f["input_ids"].shape[0]) for f in feeds),
        "metric": "1 - cos_mean of the dense model with only this unit pruned vs the dense model",
        "rows": rows,
        "plot": "sensitivity.png",
    }
    if note:
        out["note_granularity"] = note
    return out


def _row(unit, block, role, removed, reference, got, feeds, output) -> dict[str, Any]:
    from pipeline.sensitivity.quantize import output_fidelity

    fid = output_fidelity(reference, got, feeds, output)
    return {
        "unit": unit,
        "block": block,
        "role": role,
        "params": removed,
        "sensitivity": 1.0 - fid["cos_mean"],
        "cos_mean": fid["cos_mean"],
        "token_cos_min": fid["token_cos_min"],
        "max_abs_diff": fid["max_abs_diff"],
    }
