"""Per-layer quantization sensitivity joined with ORT profiler latency, and measured mixed precision.

Sensitivity (Olive / TensorRT-ModelOpt style, driven by measurement): for each unit (see
:mod:`pipeline.sensitivity.units`) a model with *only that unit* quantized is built with the target's own
converter (``exporters.quantize.convert_precision`` with every other unit in ``nodes_to_exclude``) and run on
calibration passages; its error against the fp32 ONNX model is the unit's sensitivity, ``1 - cos_mean``.

Latency share: ORT's profiler (:mod:`runtimes.profiling`) times every kernel of the fp32 model and of the
uniformly quantized model; kernels are attributed to units by node name. ``fp32_ms - quantized_ms`` is what
keeping the unit in fp32 costs.

``mixed: auto``: units are kept in fp32 one by one, most sensitive first (or most sensitive per millisecond,
``order: sensitivity_per_ms``), until the *measured* fidelity of the whole mixed model against the dense model
reaches the budget. The prefix length is found by bisection over real measurements (uniform and all-fp32
first), so the result written is always a model that was measured to meet the budget; only the claim that it
is the *shortest* prefix relies on fidelity growing with the number of units kept.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pipeline.sensitivity.config import FidelityBudget, SensitivityOptions
from pipeline.sensitivity.units import Unit, quantizable_units

__all__ = ["MIXED_PRECISIONS", "BudgetUnmet", "Evidence", "MeasuredConversion", "measured_convert", "output_fidelity"]

logger = logging.getLogger(__name__)

#: Precisions whose converter takes a per-node exclusion list (``convert_precision(nodes_to_exclude=...)``).
MIXED_PRECISIONS: tuple[str, ...] = ("int8", "int8-static")


class BudgetUnmet(ValueError):
    """The fidelity budget is not met even with every unit kept in fp32."""


@dataclass(frozen=True)
class Evidence:
    """What the measurements run on.

    Attributes:
        feeds: ONNX feeds of calibration passages (``name -> (B, S) array``), never held-out text.
        reference: the dense model's first output for each feed ((B, S, H) hidden states or (B, S, V) logits):
            the budget's reference, as in validate.
        output: name of the first model output (``last_hidden_state``, ``logits``, ...).
        torch_model: the PyTorch model the graph was exported from (labels units by block and role), or None.
    """

    feeds: list[dict[str, np.ndarray]]
    reference: list[np.ndarray]
    output: str
    torch_model: Any | None = None


@dataclass
class MeasuredConversion:
    """Result of :func:`measured_convert`: the converter's report, metrics for report.json, the plot file."""

    report: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    plot: Path | None = None


def _token_rows(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, S, D) -> (n_valid, D) float64 rows at mask != 0."""
    a = a.astype(np.float64)
    return a[mask.astype(bool)] if a.ndim == 3 and a.shape[:2] == mask.shape else a.reshape(-1, a.shape[-1])


def _row_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.sum(x * y, axis=-1) / np.maximum(den, 1e-12)


def output_fidelity(
    reference: Sequence[np.ndarray], got: Sequence[np.ndarray], feeds: Sequence[Mapping[str, np.ndarray]], output: str
) -> dict[str, float]:
    """Fidelity of ``got`` against ``reference`` over all feeds (float64).

    Hidden-state outputs: ``cos_mean``/``cos_min`` of mean-pooled, normalised embeddings per passage
    (runtimes.fidelity.mean_pool, the definition validate's ``min_cos_mean`` uses). ``logits``: mean / min
    per-token cosine. Always: ``token_cos_min`` and ``max_abs_diff`` over valid tokens (runtimes.compare).

    Args:
        reference, got: one (B, S, D) array per feed.
        feeds: the feeds (their ``attention_mask`` marks valid tokens).
        output: output name; ``logits`` selects per-token cosine.
    """
    from runtimes.compare import compare
    from runtimes.fidelity import mean_pool

    pooled, tokens, token_min, max_abs = [], [], 1.0, 0.0
    for r, g, f in zip(reference, got, feeds):
        mask = f.get("attention_mask", np.ones(r.shape[:2], dtype=np.int64))
        c = compare({output: r}, {output: g}, atol=np.inf, mask=mask)[0]
        token_min, max_abs = min(token_min, c.cosine_min), max(max_abs, c.max_abs_diff)
        tokens.append(_row_cos(_token_rows(r, mask), _token_rows(g, mask)))
        if r.ndim == 3 and output != "logits":
            pooled.append(np.sum(mean_pool(r, mask) * mean_pool(g, mask), axis=1))
    cos = np.concatenate(pooled) if pooled else np.concatenate(tokens)
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "token_cos_min": float(token_min),
        "max_abs_diff": float(max_abs),
    }


def _run(path: Path, feeds: Sequence[Mapping[str, np.ndarray]], output: str, threads: int) -> list[np.ndarray]:
    from runtimes.session import make_session

    sess = make_session(path, threads=threads)
    names = {i.name for i in sess.get_inputs()}
    return [sess.run([output], {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def _ok(fid: Mapping[str, float], budget: FidelityBudget) -> bool:
    return bool(fid["cos_mean"] >= budget.min_cos_mean)  # NaN never meets a budget


def measured_convert(
    src: Path,
    dst: Path,
    precision: str,
    convert_kwargs: Mapping[str, Any],
    *,
    options: SensitivityOptions | None,
    budget: FidelityBudget | None,
    evidence: Evidence,
    work_dir: Path,
    threads: int = 1,
) -> MeasuredConversion:
    """Convert ``src`` to ``precision`` at ``dst`` with a sensitivity report, and mixed precision if ``budget``.

    Args:
        src: fp32 ONNX model; dst: where the (uniform or mixed) model is written (atomically).
        precision: target precision; outside :data:`MIXED_PRECISIONS` the model is converted uniformly and the
            metrics say that no per-unit measurement applies.
        convert_kwargs: keyword arguments for ``convert_precision`` (calibration feeds, weight type, op types).
        options: sensitivity options (None = defaults).
        budget: the fidelity budget of ``mixed: auto``; None = report only, write the uniform model.
        evidence: calibration feeds and the dense reference.
        work_dir: folder for the per-unit models (a temp folder inside it, removed afterwards) and the plot.
        threads: ORT intra-op threads for measurement and profiling.

    Returns:
        A :class:`MeasuredConversion`; ``metrics`` holds ``sensitivity`` (rows, uniform fidelity, latency totals)
        and, with a budget, ``mixed`` (kept units, measured fidelity of the written model, probes).

    Raises:
        BudgetUnmet: ``budget`` not met even with every unit in fp32 (nothing is written to ``dst``).
    """
    from exporters.onnx import move_onnx
    from exporters.quantize import DEFAULT_INT8_OP_TYPES, _name_nodes, convert_precision
    from pipeline.sensitivity.render import plot_sensitivity
    from runtimes.profiling import attribute, profile_nodes

    options = options or SensitivityOptions()
    kw = dict(convert_kwargs)
    if precision not in MIXED_PRECISIONS:
        q = convert_precision(src, dst, precision, **kw)
        note = f"no per-unit measurement for precision '{precision}' (supported: {', '.join(MIXED_PRECISIONS)})"
        return MeasuredConversion(q, {"sensitivity": {"note": note}})
    model = onnx.load(str(src))
    _name_nodes(model)  # the names convert_precision gives unnamed nodes, so exclusions match
    op_types = tuple(kw.get("int8_op_types", DEFAULT_INT8_OP_TYPES)) if precision == "int8" else DEFAULT_INT8_OP_TYPES
    units = quantizable_units(model, op_types, torch_model=evidence.torch_model, granularity=options.granularity)
    del model
    if not units:
        q = convert_precision(src, dst, precision, **kw)
        return MeasuredConversion(q, {"sensitivity": {"note": "no quantizable weight node in the model"}})
    all_nodes = {n for u in units for n in u.nodes}
    out = evidence.output
    feeds = evidence.feeds
    sample = feeds[: options.samples]

    with tempfile.TemporaryDirectory(prefix=".sensitivity-", dir=work_dir) as tmp_dir:
        tmp = Path(tmp_dir)

        def build(name: str, keep: set[str]) -> tuple[Path, Any]:
            path = tmp / name / "model.onnx"
            rep = convert_precision(src, path, precision, nodes_to_exclude=sorted(keep), **kw)
            return path, rep

        # ---- one unit at a time, against the fp32 ONNX model
        ref_fp32 = _run(src, sample, out, threads)
        rows: list[dict[str, Any]] = []
        for i, u in enumerate(units):
            path, _ = build(f"unit{i}", all_nodes - set(u.nodes))
            fid = output_fidelity(ref_fp32, _run(path, sample, out, threads), sample, out)
            shutil.rmtree(path.parent)
            rows.append(_row(u, fid))
            logger.info("sensitivity %d/%d %s: %.3g", i + 1, len(units), u.name, rows[-1]["sensitivity"])

        # ---- uniform model: fidelity vs dense, and the profiles
        uniform, uniform_rep = build("uniform", set())
        uniform_fid = output_fidelity(evidence.reference, _run(uniform, feeds, out, threads), feeds, out)
        prof_feeds = feeds[: min(4, len(feeds))]
        p32 = profile_nodes(src, prof_feeds, runs=options.profile_runs, threads=threads, work_dir=tmp)
        pq = profile_nodes(uniform, prof_feeds, runs=options.profile_runs, threads=threads, work_dir=tmp)
        groups = {u.name: u.nodes for u in units}
        ms32, msq = attribute(p32, groups), attribute(pq, groups)
        for r in rows:
            r["fp32_ms"] = ms32[r["unit"]]
            r["quantized_ms"] = msq[r["unit"]]
            r["latency_share"] = ms32[r["unit"]] / p32.total_ms if p32.total_ms > 0 else float("nan")
            r["gain_ms"] = ms32[r["unit"]] - msq[r["unit"]]
        sens = {
            "granularity": options.granularity,
            "precision": precision,
            "samples": len(sample),
            "metric": "1 - cos_mean of the model with only this unit quantized vs the fp32 ONNX model",
            "rows": rows,
            "uniform": uniform_fid,
            "latency": {
                "fp32_total_ms": p32.total_ms,
                "quantized_total_ms": pq.total_ms,
                "attributed_share_fp32": sum(ms32.values()) / p32.total_ms if p32.total_ms > 0 else float("nan"),
                "profiled_feeds": len(prof_feeds),
                "runs": options.profile_runs,
                "threads": threads,
            },
        }
        metrics: dict[str, Any] = {"sensitivity": sens}
        final, final_rep = uniform, uniform_rep
        if budget is not None:
            order = _order(rows, options.order)
            probes: list[dict[str, Any]] = []
            built: dict[int, tuple[Path, Any, dict[str, float]]] = {0: (uniform, uniform_rep, uniform_fid)}

            def probe(k: int) -> bool:
                if k not in built:
                    keep = {n for r in order[:k] for n in groups[r["unit"]]}
                    path, rep = build(f"keep{k}", keep)
                    built[k] = (
                        path,
                        rep,
                        output_fidelity(evidence.reference, _run(path, feeds, out, threads), feeds, out),
                    )
                fid = built[k][2]
                logger.info("mixed: %d unit(s) kept in fp32 -> cos_mean %.6f", k, fid["cos_mean"])
                probes.append({"kept": k, "cos_mean": fid["cos_mean"], "ok": _ok(fid, budget)})
                return _ok(fid, budget)

            n = len(order)
            if probe(0):
                k = 0
            elif not probe(n):
                raise BudgetUnmet(
                    f"budget min_cos_mean {budget.min_cos_mean:g} cannot be met: with all {n} units kept in fp32 the"
                    f" model measures cos_mean {built[n][2]['cos_mean']:.4f} against the dense model on calibration"
                    " text (the loss comes before quantize, e.g. from pruning)"
                )
            else:
                lo, hi = 0, n  # lo fails, hi meets the budget
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if probe(mid) else (mid, hi)
                k = hi
            final, final_rep, final_fid = built[k]
            kept = [r["unit"] for r in order[:k]]
            for r in rows:
                r["kept_fp32"] = r["unit"] in kept
            total_params = sum(u.params for u in units)
            metrics["mixed"] = {
                "budget": budget.model_dump(),
                "order": options.order,
                "kept_fp32": kept,
                "kept_params_share": sum(r["params"] for r in rows if r["kept_fp32"]) / max(total_params, 1),
                "units": n,
                "cos_mean": final_fid["cos_mean"],
                "cos_min": final_fid["cos_min"],
                "uniform_cos_mean": uniform_fid["cos_mean"],
                "probes": probes,
            }
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        move_onnx(final, dst)
    plot = plot_sensitivity(rows, work_dir / "sensitivity.png", title=f"{precision}: per-unit sensitivity")
    return MeasuredConversion(final_rep, metrics, plot)


def _row(u: Unit, fid: Mapping[str, float]) -> dict[str, Any]:
    return {
        "unit": u.name,
        "block": u.block,
        "role": u.role,
        "nodes": list(u.nodes),
        "params": u.params,
        "sensitivity": 1.0 - fid["cos_mean"],
        "cos_mean": fid["cos_mean"],
        "token_cos_min": fid["token_cos_min"],
        "max_abs_diff": fid["max_abs_diff"],
    }


def _order(rows: list[dict[str, Any]], order: str) -> list[dict[str, Any]]:
    """Rows in the order mixed precision keeps them in fp32 (stable: ties keep graph order)."""
    if order == "sensitivity":
        return sorted(rows, key=lambda r: -r["sensitivity"])
    # sensitivity per millisecond that keeping the unit in fp32 costs; a unit that is not slower in fp32 is free
    return sorted(rows, key=lambda r: -r["sensitivity"] / max(r["gain_ms"], 1e-6))
