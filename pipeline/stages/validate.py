"""validate: structural check, ORT-vs-PyTorch parity and task fidelity vs the dense model, per target;
writes each target's standalone on-device bundle. Gate failures are recorded (the run fails after the report)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.artifact import Artifact, TargetModel, atomic_write_json
from pipeline.errors import StageError
from pipeline.loaded import is_causal_lm
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import (
    cap_length,
    encode,
    load_dense,
    load_from_artifact,
    model_max_positions,
    progress_bar,
    text_sets,
    to_numpy_feeds,
    write_target_bundle,
)

__all__ = ["ValidateConfig", "run_validate"]

_PROMPT_TOKENS = 8  # greedy-generation parity: prompt tokens taken from the first held-out batch


class ValidateConfig(StageConfig):
    kind = "validate"
    samples: int | None = Field(
        None, ge=4, description="held-out passages to validate on; omitted = calibration.heldout"
    )
    min_cos_mean: float | None = Field(
        0.9, ge=-1, le=1, description="encoders: gate on mean embedding cosine vs the dense model (null = report only)"
    )
    min_recall_at_10: float | None = Field(
        None, ge=0, le=1, description="encoders: gate on neighbour recall@10 vs dense"
    )
    min_top1_agreement: float | None = Field(
        None, ge=0, le=1, description="LMs: gate on next-token top-1 agreement vs dense"
    )
    max_ppl_ratio: float | None = Field(None, gt=0, description="causal LMs: gate on perplexity / dense perplexity")
    generation_tokens: int = Field(
        8, ge=1, le=256, description="causal LMs: greedy tokens for the generation parity check"
    )
    bundle: bool = Field(True, description="write the standalone on-device evaluation bundle for each target")
    memory_arena_factor: float = Field(
        4.0, gt=0, le=64, description="memory estimate: arena bytes per peak live intermediate byte ([I], MiniLM fit)"
    )
    memory_overhead_mb: float = Field(
        10.0, ge=0, le=65536, description="memory estimate: fixed ONNX Runtime session overhead in MiB ([I])"
    )


def _below(value: float, limit: float) -> bool:
    """Gate test that fails on NaN: ``value < limit`` is False for NaN, ``not value >= limit`` is True."""
    return not value >= limit


def _fidelity_failures(
    target: str, fid: dict[str, float], limits: dict[str, float | None], *, at_most: bool = False
) -> list[dict[str, Any]]:
    """One failure entry per fidelity metric of ``fid`` outside its limit (``limits``: metric -> minimum, or maximum
    with ``at_most``; None = not gated). NaN fails either way."""
    return [
        {"target": target, "check": check, "value": round(fid[check], 4), "limit": limit}
        for check, limit in limits.items()
        if limit is not None and (not fid[check] <= limit if at_most else _below(fid[check], limit))
    ]


def _run_session(sess, feeds_list, names):
    outs = [dict(zip(names, sess.run(list(names), f))) for f in feeds_list]
    return outs


def _pad_cat(arrs: list[np.ndarray]) -> np.ndarray:
    """Concatenate (B, S, ...) arrays of different S along B, zero-padding S."""
    s = max(a.shape[1] for a in arrs)
    return np.concatenate([np.pad(a, [(0, 0), (0, s - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrs])


@dataclass(frozen=True)
class _View:
    """The held-out batches as one input shape sees them, with their PyTorch references.

    ``feeds``/``ref_cur``/``valid``: per batch (B, S) feeds, current-model outputs and the (B, S) validity mask
    (the attention mask; for a static shape also 0 on filler rows). ``masks``/``ids``/``dense_first``: all
    batches joined, filler rows dropped (``rows`` selects the real rows of a joined target output).
    """

    feeds: list[dict[str, np.ndarray]]
    ref_cur: list[dict[str, np.ndarray]]
    valid: list[np.ndarray]
    rows: np.ndarray
    masks: np.ndarray
    ids: np.ndarray
    dense_first: np.ndarray

    @classmethod
    def build(cls, batches, io, loaded, dense, shape: tuple[int, int] | None) -> _View:
        from exporters.onnx import torch_reference

        feeds = [to_numpy_feeds(b, io) for b in batches]
        if shape is None:
            valid = [f["attention_mask"] for f in feeds]
        else:  # (batch, seq) chunks: padded/truncated inputs, filler rows marked invalid
            from exporters.static_shapes import fit_feeds

            chunks = [c for f in feeds for c in fit_feeds(f, *shape)]
            feeds, valid = [c[0] for c in chunks], [c[1] for c in chunks]
        ref_cur = [torch_reference(loaded, f) for f in feeds]
        first = io["output_names"][0]
        rows = np.flatnonzero(_pad_cat(valid).any(axis=1))  # real rows: every passage has >= 1 token
        return cls(
            feeds=feeds,
            ref_cur=ref_cur,
            valid=valid,
            rows=rows,
            masks=_pad_cat(valid)[rows],
            ids=_pad_cat([f["input_ids"] for f in feeds])[rows],
            dense_first=_pad_cat([torch_reference(dense, f)[first] for f in feeds])[rows],
        )


@register_stage(ValidateConfig)
def run_validate(art: Artifact, cfg: ValidateConfig, ctx: StageContext) -> Artifact:
    """Check every target's model: onnx checker, parity vs PyTorch (profile tolerance), fidelity vs dense."""
    import onnx

    from runtimes.compare import compare, comparison_table
    from runtimes.fidelity import embedding_fidelity, lm_fidelity, mean_pool
    from runtimes.session import make_session

    if not art.targets:
        raise StageError("validate", "no ONNX model yet: put an 'export' stage before 'validate'")
    loaded = load_from_artifact(art, ctx, reference=True)
    dense = load_dense(art)
    _, heldout = text_sets(ctx)
    heldout = heldout[: cfg.samples] if cfg.samples else heldout
    batches = encode(
        loaded, heldout, max_length=ctx.run.calibration.max_length, batch_size=ctx.run.calibration.batch_size, ctx=ctx
    )
    decoder = is_causal_lm(art.family, art.task)

    # PyTorch references, computed once per input shape: the current (maybe pruned) model for parity, the dense
    # one for fidelity; a static-shape target gets its own, on the same padded/truncated inputs it runs
    any_io = next(iter(art.targets.values())).io
    first = any_io["output_names"][0]
    views: dict[Any, _View] = {}

    failures: list[dict[str, Any]] = []
    out = art
    summary: dict[str, Any] = {}
    for name in progress_bar(ctx, list(ctx.targets), desc="validate"):
        prof = ctx.targets[name]
        tm = art.targets[name]
        shape = (prof.static_shapes.batch, prof.static_shapes.seq) if prof.static_shapes else None
        if shape not in views:
            views[shape] = _View.build(batches, any_io, loaded, dense, shape)
        view = views[shape]
        feeds_all, ref_cur, valid = view.feeds, view.ref_cur, view.valid
        masks, ids, dense_first = view.masks, view.ids, view.dense_first
        path = ctx.resolve(tm.model)
        onnx.checker.check_model(str(path), full_check=True)
        tol = prof.tolerances[tm.precision]
        sess = make_session(path, threads=min(prof.threads or 2, 2))
        names_in = tm.io["input_names"]
        got = _run_session(sess, [{k: f[k] for k in names_in} for f in feeds_all], tm.io["output_names"])
        rows = []
        for g, r, m in zip(got, ref_cur, valid):
            rows.extend(compare({first: r[first]}, {first: g[first]}, atol=tol.atol, min_cosine=tol.min_cosine, mask=m))
        parity = {
            "max_abs_diff": float(max(c.max_abs_diff for c in rows)),
            "cosine_min": float(min(c.cosine_min for c in rows)),
            "atol": tol.atol,
            "min_cosine": tol.min_cosine,
            "ok": bool(all(c.ok for c in rows)),
        }
        value, limit = (
            f"max_abs_diff {parity['max_abs_diff']:.3g}, cos_min {parity['cosine_min']:.4f}",
            f"atol {tol.atol}, min_cosine {tol.min_cosine}",
        )
        if first == "logits" and tol.min_top1 is not None:  # (B, S, vocab): next-token argmax vs the reference
            same = np.concatenate(
                [(g[first].argmax(-1) == r[first].argmax(-1))[m.astype(bool)] for g, r, m in zip(got, ref_cur, valid)]
            )
            parity |= {"top1_agreement": float(same.mean()), "min_top1": tol.min_top1}
            parity["ok"] = parity["ok"] and not _below(parity["top1_agreement"], tol.min_top1)
            value += f", top1 {parity['top1_agreement']:.4f}"
            limit += f", min_top1 {tol.min_top1}"
        if not parity["ok"]:
            failures.append({"target": name, "check": "parity", "value": value, "limit": limit})
        got_first = _pad_cat([g[first] for g in got])[view.rows]
        if decoder or first == "logits":
            fid = lm_fidelity(dense_first, got_first, ids, masks)
            failures += _fidelity_failures(name, fid, {"top1_agreement": cfg.min_top1_agreement})
            if decoder:
                failures += _fidelity_failures(name, fid, {"ppl_ratio": cfg.max_ppl_ratio}, at_most=True)
        else:
            fid = embedding_fidelity(mean_pool(dense_first, masks), mean_pool(got_first, masks))
            failures += _fidelity_failures(
                name, fid, {"cos_mean": cfg.min_cos_mean, "recall_at_10": cfg.min_recall_at_10}
            )
        metrics: dict[str, Any] = {**dict(tm.metrics), "parity": parity, "fidelity": fid}
        if decoder and tm.io.get("with_past"):
            prompt_len = min(_PROMPT_TOKENS, feeds_all[0]["input_ids"].shape[1])
            n_new = cap_length(loaded, cfg.generation_tokens, "validate.generation_tokens", ctx, reserve=prompt_len)
            metrics["generation"] = _generation_parity(loaded, sess, tm, feeds_all[0], n_new)
            if tm.precision == "fp32" and not metrics["generation"]["identical"]:
                failures.append(
                    {
                        "target": name,
                        "check": "greedy_generation",
                        "value": f"{metrics['generation']['token_agreement']:.3f} agreement",
                        "limit": "identical tokens (fp32)",
                    }
                )
        files = dict(tm.files)
        promises, broken = _profile_promises(
            ctx, cfg, name, prof, tm, path, feeds_all[0], model_max_positions(loaded.model)
        )
        files["placement"] = promises.pop("placement")
        metrics.update(promises)
        failures.extend(broken)
        if cfg.bundle:
            real0 = valid[0].any(axis=1)  # (B,): rows of the first batch that are passages, not filler
            bundle = write_target_bundle(
                ctx,
                ctx.subdir(name, "bundle"),
                prof,
                tm,
                {k: feeds_all[0][k][real0] for k in names_in},  # the real rows: the bundle pads them itself
                {first: ref_cur[0][first][real0]},
                threads=prof.threads or 1,
            )
            files["bundle"] = ctx.ref(bundle)
        summary[name] = {
            "precision": tm.precision,
            "parity": parity,
            "fidelity": fid,
            "table": comparison_table(rows[:1]),
            **promises,
        }
        out = out.with_target(
            name, TargetModel(model=tm.model, precision=tm.precision, io=tm.io, files=files, metrics=metrics)
        )
    ctx.metrics.update({"targets": summary, "failures": failures, "passages": len(heldout)})
    return out


def _profile_promises(
    ctx: StageContext, cfg: ValidateConfig, name: str, prof, tm: TargetModel, path, feeds, limit: int | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The profile's memory budget (estimated from the graph at the largest configured batch x seq, decoders'
    KV cache at the profile's max context) and provider coverage (``min_provider_coverage``, placed on ``feeds``:
    numpy feeds in the target's input shape): metrics, the placement file (every node's provider) and failure
    rows."""
    from runtimes.memory import budget_failure, estimate_memory, feed_shapes, max_context, memory_shape
    from runtimes.placement import coverage_failure, provider_coverage

    b, s = memory_shape(ctx.run.calibration, prof, limit)
    context = max_context(prof, limit) if tm.io.get("with_past") else None
    shapes = feed_shapes(tm.io, b, s, context)
    est = estimate_memory(
        path, shapes, io=tm.io, arena_factor=cfg.memory_arena_factor, overhead_mb=cfg.memory_overhead_mb
    )
    est["budget_mb"] = prof.memory_budget_mb
    cov, placement = provider_coverage(path, feeds, prof.providers, threads=1)
    out = ctx.subdir(name) / "placement.json"
    atomic_write_json(out, {"provider": cov["provider"], "method": cov["method"], "nodes": placement})
    broken = [
        f
        for f in (budget_failure(name, prof.memory_budget_mb, est, measured=False), coverage_failure(name, prof, cov))
        if f
    ]
    return {"memory_estimate": est, "provider_coverage": cov, "placement": ctx.ref(out)}, broken


def _generation_parity(loaded, sess, tm: TargetModel, feeds: dict, n_tokens: int) -> dict[str, Any]:
    from pathlib import Path

    from exporters.onnx import ExportResult
    from runtimes.generate import greedy_generate_ort, greedy_generate_torch

    io: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in tm.io.items()}
    res = ExportResult(path=Path("."), **io)
    prompts = feeds["input_ids"][:, :_PROMPT_TOKENS]
    ort_ids = greedy_generate_ort(sess, res, prompts, n_tokens)
    pt_ids = greedy_generate_torch(loaded, prompts, n_tokens)
    agree = float(np.mean(ort_ids[:, -n_tokens:] == pt_ids[:, -n_tokens:]))
    return {
        "tokens": n_tokens,
        "prompts": int(prompts.shape[0]),
        "identical": bool(np.array_equal(ort_ids, pt_ids)),
        "token_agreement": agree,
    }
