"""Publish per-target folders and write report.json, report.md (tables + plots) and manifest.json."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exporters.onnx import data_file, model_bytes
from pipeline.artifact import (
    Artifact,
    atomic_write_json,
    atomic_write_text,
    hash_file,
    make_temp_dir,
    replace_dir,
    temp_file_near,
)
from pipeline.errors import ConfigError
from runtimes.memory import memory_summary, without_superseded_estimates

logger = logging.getLogger(__name__)

__all__ = ["publish_targets", "write_reports"]


def _copy(src: Path, dst: Path) -> None:
    """An independent copy (not a hard link): a user who edits a published file in place must not change the
    stage cache that the next run republishes as "cached"."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def publish_targets(art: Artifact, run_dir: Path, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Assemble ``run_dir/<target>/`` (model, .ort + required-ops config, bundle/) atomically from stage outputs."""
    published: dict[str, dict[str, str]] = {}
    for name in names:
        tm = art.targets.get(name)
        if tm is None:
            continue
        tmp = make_temp_dir(run_dir, f".{name}.tmp-")
        files: dict[str, str] = {}
        src = run_dir / tm.model
        _copy(src, tmp / "model.onnx")
        files["model"] = f"{name}/model.onnx"
        if data_file(src).is_file():  # external data: its name is recorded inside the graph (see exporters.onnx)
            if data_file(src).name != "model.onnx.data":
                raise ValueError(f"{src}: external data {data_file(src).name} cannot be published as model.onnx.data")
            _copy(data_file(src), tmp / "model.onnx.data")
            files["model_data"] = f"{name}/model.onnx.data"
        for label, ref in tm.files.items():
            p = run_dir / ref
            if p.is_dir():
                for f in sorted(q for q in p.rglob("*") if q.is_file()):
                    _copy(f, tmp / label / f.relative_to(p))
                files[label] = f"{name}/{label}"
            elif p.is_file():
                dst_name = (
                    "model.ort"
                    if label == "ort"
                    else ("model.required_operators.config" if label == "required_operators" else p.name)
                )
                _copy(p, tmp / dst_name)
                files[label] = f"{name}/{dst_name}"
        replace_dir(tmp, run_dir / name)
        published[name] = files
    return published


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _plots(run_dir: Path, targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [(n, t) for n, t in targets.items() if t.get("latency_ms")]
    if not rows:
        return []
    try:
        import matplotlib
    except ImportError:  # optional (extra 'plots'): the tables say the same
        logger.warning("latency plots skipped: matplotlib is not installed (pip install 'edgepipe[plots]')")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = run_dir / "plots"
    if plot_dir.is_symlink():
        raise ConfigError(
            f"run folder '{run_dir}': 'plots' is a symbolic link; edgepipe does not write through links (remove it)"
        )
    plot_dir.mkdir(exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [n for n, _ in rows]
    p50 = [t["latency_ms"]["p50"] for _, t in rows]
    p95 = [t["latency_ms"]["p95"] for _, t in rows]
    xs = range(len(rows))
    a1.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    a1.bar([x + 0.2 for x in xs], p95, 0.4, label="p95")
    a1.set_xticks(list(xs), names, rotation=20, ha="right")
    a1.set_ylabel("ms (this host)")
    a1.set_title("Latency per target")
    a1.legend()
    a2.bar(list(xs), [t["size_bytes"] / 1e6 for _, t in rows], 0.6, color="tab:green")
    a2.set_xticks(list(xs), names, rotation=20, ha="right")
    a2.set_ylabel("MB")
    a2.set_title("Model size")
    fig.tight_layout()
    tmp = temp_file_near(plot_dir / "targets.png")  # unpredictable name, created O_EXCL: never a planted link
    try:
        fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        os.replace(tmp, plot_dir / "targets.png")
    finally:
        tmp.unlink(missing_ok=True)
    return ["plots/targets.png"]


def write_reports(
    *,
    run_dir: Path,
    cfg: Any,
    target_names: Sequence[str],
    art: Artifact,
    records: list[dict[str, Any]],
    published: Mapping[str, Mapping[str, str]],
    manifest_extra: Mapping[str, Any],
    seconds: float,
) -> dict[str, Any]:
    failures: list[dict[str, Any]] = []
    for r in records:
        failures.extend(r["metrics"].get("failures", []) if isinstance(r.get("metrics"), dict) else [])
    targets: dict[str, Any] = {}
    for name in target_names:
        tm = art.targets.get(name)
        if tm is None:
            continue
        m = dict(tm.metrics)
        files = dict(published.get(name, {}))
        model_file = run_dir / files["model"]
        targets[name] = {
            "artifact": files.pop("model"),
            "size_bytes": model_bytes(model_file),
            "precision": tm.precision,
            "parity": m.get("parity"),
            "fidelity": m.get("fidelity"),
            "latency_ms": m.get("latency_ms"),
            "peak_rss_mb": m.get("peak_rss_mb"),
            "memory": memory_summary(
                (m.get("memory_measured") or m.get("memory_estimate") or {}).get("budget_mb"),
                m.get("memory_estimate"),
                m.get("memory_measured"),
            ),
            "provider_coverage": m.get("provider_coverage"),
            "files": files,
            **({"generation": m["generation"]} if "generation" in m else {}),
        }
    failures = without_superseded_estimates(failures, {n: t["memory"] for n, t in targets.items()})
    report = {
        "edgepipe": manifest_extra.get("versions", {}).get("edgepipe"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": art.task,
        "family": art.family,
        "model": manifest_extra.get("inputs", {}).get("model_path"),
        "seconds": round(seconds, 3),
        "stages": records,
        "targets": targets,
        "ok": not failures,
        "failures": failures,
    }
    if failures:
        head = "| target | check | value | limit |\n|---|---|---|---|\n"
        report["failure_table"] = head + "\n".join(
            f"| {f['target']} | {f['check']} | {f['value']} | {f['limit']} |" for f in failures
        )
    plots = _plots(run_dir, targets)
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", _markdown(report, plots))
    outputs = {}
    for published_files in published.values():
        for _label, rel in published_files.items():
            p = run_dir / rel
            if p.is_file():
                outputs[rel] = hash_file(p)
    manifest = {
        "config": cfg.to_data(),
        "seed": cfg.seed,
        **manifest_extra,
        "outputs_sha256": outputs,
        "stages": [{"name": r["name"], "folder": r["folder"], "status": r["status"]} for r in records],
    }
    atomic_write_json(run_dir / "manifest.json", manifest)
    return report


def _markdown(rep: Mapping[str, Any], plots: list[str]) -> str:
    L = [
        "# edgepipe report",
        "",
        f"- model: `{rep['model']}` ({rep['family']}, {rep['task']})",
        f"- created: {rep['created']}, total {rep['seconds']:.1f} s",
        f"- result: {'**all checks passed**' if rep['ok'] else '**FAILED** — see below'}",
        "",
    ]
    if rep.get("failures"):
        L += ["## Failed checks", "", rep["failure_table"], ""]
    L += [
        "## Targets",
        "",
        "| target | precision | size MB | parity max abs diff | parity ok | cos mean / min | recall@10 | top-1 agree | p50 ms | p95 ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in rep["targets"].items():
        par = t.get("parity") or {}
        fid = t.get("fidelity") or {}
        lat = t.get("latency_ms") or {}
        cos = f"{_fmt(fid.get('cos_mean'))} / {_fmt(fid.get('cos_min'))}" if "cos_mean" in fid else "–"
        L.append(
            f"| {name} | {t['precision']} | {_fmt(t['size_bytes'] / 1e6, 3)} | {_fmt(par.get('max_abs_diff'), 3)} | {_fmt(par.get('ok'))} | {cos} | {_fmt(fid.get('recall_at_10'))} | {_fmt(fid.get('top1_agreement'))} | {_fmt(lat.get('p50'), 3)} | {_fmt(lat.get('p95'), 3)} | {_fmt(t.get('peak_rss_mb'), 4)} |"
        )
    if any(t.get("latency_ms") for t in rep["targets"].values()):
        L += [
            "",
            "Latency and memory were measured on the host that ran edgepipe, not on the device; run each target's `bundle/evaluate.py` on the device for its own numbers.",
            "",
        ]
    else:
        L += ["", "No benchmark stage ran: latency and memory were not measured.", ""]
    L += _promises_lines(rep["targets"])
    for p in plots:
        L += [f"![targets]({p})", ""]
    L += ["## Stages", "", "| # | stage | status | seconds |", "|---|---|---|---|"]
    for i, r in enumerate(rep["stages"], 1):
        L.append(f"| {i} | {r['name']} | {r['status']} | {r['seconds']:.2f} |")
    L.append("")
    for r in rep["stages"]:
        m = r.get("metrics") or {}
        for note in m.get("notes") or []:  # settings adjusted to the model (e.g. lengths capped at its position limit)
            L.append(f"- note ({r['name']}): {note}")
        for warning in m.get("warnings") or []:  # e.g. too little calibration text, no validate stage
            L.append(f"- **warning** ({r['name']}): {warning}")
        if r["name"] == "prune" and m:
            sp = m.get("sparsity") or {}
            ae = m.get("attention_error") or {}
            parts = ", ".join(f"{k} {_fmt(v)}" for k, v in (m.get("parts") or {}).items())
            L += [
                "### prune",
                "",
                f"- {m.get('method')} / {m.get('pattern')}: overall sparsity {_fmt(sp.get('overall'))} ({parts}); {_fmt(m.get('seconds'))} s",
            ]
            if ae:  # transformers only (score networks have no attention)
                L.append(
                    f"- attention error vs dense (relative Frobenius, held-out): mean {_fmt(ae.get('mean'))}, row KL mean {_fmt(ae.get('row_kl_mean'))}"
                )
            if m.get("warning"):
                L.append(f"- warning: {m['warning']}")
            per = ae.get("per_layer") or []
            outs = m.get("layer_output_error") or []
            if per or outs:
                L += ["", "| layer | attention error | row KL | layer output error |", "|---|---|---|---|"]
                kl = ae.get("row_kl") or []
                for i in range(max(len(per), len(outs))):
                    L.append(
                        f"| {i} | {_fmt(per[i] if i < len(per) else None)} | {_fmt(kl[i] if i < len(kl) else None)} | {_fmt(outs[i] if i < len(outs) else None)} |"
                    )
            L.append("")
        if r["name"] in ("quantize", "prune") and m:  # per-layer sensitivity (pipeline.sensitivity)
            from pipeline.sensitivity.render import sensitivity_markdown

            sens_plots = {
                n: t["files"]["sensitivity_plot"] for n, t in rep["targets"].items() if "sensitivity_plot" in t["files"]
            }
            if (m.get("sensitivity") or {}).get("plot"):
                sens_plots[""] = f"{r['folder']}/{m['sensitivity']['plot']}"
            L += sensitivity_markdown(r["name"], m, sens_plots)
        if r["name"] == "recover" and m:
            L += [
                "### recover",
                "",
                f"- {m.get('steps')} steps ({m.get('loss')}), {_fmt(m.get('seconds'))} s; held-out before {m.get('heldout_before')} -> after {m.get('heldout_after')}"
                + (" — **rolled back** (it got worse)" if m.get("rolled_back") else ""),
            ]
            al = m.get("almost_linear")
            if al:
                L.append(
                    f"- attention gradient: almost-linear (polynomial degree {al['degree']}, {al['features']} features"
                    f" per head of dim {al['head_dim']}, logit cap β {_fmt(al['beta'])}, {al['tokens']} tokens)"
                )
            L.append("")
        if r["name"] == "verify_diffusion" and m:
            L += _verify_diffusion_lines(m)
        if r["name"] == "verify_gradient" and m.get("kernel_gradients"):
            L += _verify_gradient_lines(m)
        if r["name"] == "private_context" and "epsilon" in m:
            L += _private_context_lines(m)
        if r["name"] == "verify_dp" and m.get("gate"):
            L += _verify_dp_lines(m)
        if r["name"] == "attention" and m:
            L += [
                "### attention",
                "",
                f"- kernel {m.get('kernel')}: {m.get('replaced')} modules replaced, max |swapped - reference| {_fmt(m.get('max_abs_diff_vs_reference'), 3)}"
                + (f", block density {_fmt(m.get('block_density'))}" if "block_density" in m else ""),
                "",
            ]
    return "\n".join(L)


def _promises_lines(targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Memory budget (budget, figure, headroom) and share on the preferred provider, one row per target."""
    rows = [(n, t) for n, t in targets.items() if t.get("memory") or t.get("provider_coverage")]
    if not rows:
        return []
    L = [
        "## Memory budget and provider coverage",
        "",
        "| target | budget MiB | estimate MiB | measured MiB | headroom MiB | within | first provider | how | node share | FLOP share | nodes off it |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in rows:
        mem = t.get("memory") or {}
        cov = t.get("provider_coverage") or {}
        off = ", ".join(f"{op}×{k}" for op, k in list((cov.get("unsupported") or {}).items())[:6])
        more = len(cov.get("unsupported") or {}) - 6
        off += f" (+{more} more types)" if more > 0 else ""
        L.append(
            f"| `{name}` | {_fmt(mem.get('budget_mb'))} | {_fmt(mem.get('estimate_mb'))} | {_fmt(mem.get('measured_mb'))} | {_fmt(mem.get('headroom_mb'))} | {_fmt(mem.get('ok'))} | {cov.get('provider', '–')} | {cov.get('method', '–')} | {_fmt(cov.get('node_share'))} | {_fmt(cov.get('flop_share'))} | {off or '–'} |"
        )
    L += [
        "",
        "Memory: the rise in resident memory from before the ONNX Runtime session to the peak of inference"
        " (measured by benchmark in a fresh process; estimated by validate from the graph); headroom is from the"
        " measured figure where there is one. Provider share: `measured` from ONNX Runtime's profile on this host,"
        " `static` from the provider's documented operator list (an approximation); FLOPs count"
        " MatMul/Gemm/Conv/Attention only. Each target's `placement.json` lists every node's provider.",
        "",
    ]
    return L


def _verify_diffusion_lines(m: Mapping[str, Any]) -> list[str]:
    """The verify_diffusion section: per network ε_score², certificate and measured TV, plus the references."""
    eps, cert, tv, lip = m["score_mse"], m["tv_certificate"], m["tv_measured"], m["lipschitz"]
    L = [
        "### verify_diffusion",
        "",
        f"- DDPM, {cert['steps']} {cert['spacing']} steps, T={_fmt(cert['T'])}, δ={_fmt(cert['delta'])}; measured with {tv['samples']} samples ({tv['sampler']}); gate: {'passed' if m['gate']['ok'] else '**FAILED**'}",
        f"- Lipschitz: network {_fmt(lip['empirical'])} (dense {_fmt(lip['dense'])}), exact score {_fmt(lip['exact'])}, k-independent bound {_fmt(lip['bound'])}",
        f"- measured-TV references: exact score {_fmt(tv.get('exact_score'))}, estimator floor {_fmt(tv.get('floor'))}",
        "",
        "| network | ε_score² | TV certificate (constants 1) | score-limited certificate | measured TV |",
        "|---|---|---|---|---|",
    ]
    terms = cert["terms"]
    rows = [("dense", eps["dense"], cert["dense"], terms["dense"], tv.get("dense"))]
    rows += [
        (n, eps["per_target"][n], cert["per_target"][n], terms["per_target"][n], (tv.get("per_target") or {}).get(n))
        for n in eps["per_target"]
    ]
    L += [f"| {n} | {_fmt(e)} | {_fmt(c)} | {_fmt(t.get('score_limited'))} | {_fmt(v)} |" for n, e, c, t, v in rows]
    return L + [""]


def _verify_gradient_lines(m: Mapping[str, Any]) -> list[str]:
    """The verify_gradient section: per-layer kernel-gradient errors, the beta table, the fast gradient."""
    kg, lim = m["kernel_gradients"], m.get("limits") or {}
    heads = m.get("heads") or []
    L = [
        "### verify_gradient",
        "",
        f"- kernel gradients of the model as it stands (attention kernel: {m.get('kernel') or 'unchanged'}) vs float64"
        f" exact autograd, {m.get('samples')} calibration passages: max relative error {_fmt(kg.get('max_rel_err'), 3)}"
        + (f" (gate ≤ {_fmt(lim['max_rel_err'], 3)})" if "max_rel_err" in lim else ""),
        f"- heads in the polynomial (almost-linear) regime: {m.get('applicable_heads', 0)} of {len(heads)}"
        + (f" (kernel error {_fmt(lim['kernel_eps'], 3)} by the Taylor bound)" if "kernel_eps" in lim else ""),
    ]
    fg = m.get("fast_gradient")
    if fg:
        ratio = fg["exact_seconds"] / fg["seconds"] if fg.get("seconds") else None
        L.append(
            f"- fast gradient at {fg['seq_len']} tokens: relative error {_fmt(fg['rel_err'], 3)}"
            + (f" (gate ≤ {_fmt(lim['max_fast_rel_err'], 3)})" if "max_fast_rel_err" in lim else "")
            + f", {_fmt(fg['seconds'], 3)} s vs exact autograd {_fmt(fg['exact_seconds'], 3)} s ({_fmt(ratio, 3)}×)"
        )
    else:
        L.append("- fast gradient: not computed (no head is in the regime, or see the notes above)")
    L += ["", "| layer | relative gradient error | max abs error | parameters |", "|---|---|---|---|"]
    L += [
        f"| {row['layer']} | {_fmt(row['rel_err'], 3)} | {_fmt(row.get('max_abs_err'), 3)} | {row.get('params', '–')} |"
        for row in kg.get("per_layer") or []
    ]
    if heads:
        L += [
            "",
            "β = max |q·k|/√d per head on calibration text (β p99: its 99th percentile); degree and features are what"
            " the Taylor bound needs for the kernel error above.",
            "",
            "| layer | head | β | β p99 | applies | degree | features |",
            "|---|---|---|---|---|---|---|",
        ]
        L += [
            f"| {h['layer']} | {h['head']} | {_fmt(h['beta'], 3)} | {_fmt(h['beta_p99'], 3)} | {'yes' if h['applicable'] else 'no'} | {_fmt(h['degree'])} | {_fmt(h['features'], 3)} |"
            for h in heads
        ]
    return L + [""]


def _private_context_lines(m: Mapping[str, Any]) -> list[str]:
    """The private_context section: the guarantee as stated, the noise, and what ships vs the raw context."""
    raw = m.get("raw_context_bytes")
    L = [
        "### private_context",
        "",
        f"- guarantee: {m.get('guarantee', '–')}",
        f"- mechanism {m.get('mechanism')}, ε = {_fmt(m['epsilon'])}, δ = {_fmt(m['delta'])} ({m.get('accounting')} accounting"
        f" over {m.get('heads_replaced')} releases); noise σ = {_fmt(m.get('sigma'), 3)} for sensitivity Δ = {_fmt(m.get('sensitivity'), 3)}"
        f" ({m.get('sampler')}); exact δ of that noise {_fmt(m.get('exact_delta'), 3)}",
        f"- context: {m.get('context_tokens')} tokens; {m.get('heads_replaced')} heads in {m.get('layers_replaced')} layer(s) read a"
        f" release of {m.get('features')} features each; public bounds ‖k‖∞ ≤ {_fmt(m.get('key_bound'), 3)}, |v| ≤ {_fmt(m.get('value_bound'), 3)}",
        f"- ships: {m.get('bytes_shipped')} bytes of noisy summaries"
        + (f" (the raw context keys/values, float32, would be {raw} bytes)" if raw else ""),
        "",
    ]
    return L


def _verify_dp_lines(m: Mapping[str, Any]) -> list[str]:
    """The verify_dp section: the audits, the utility against exact and uniform attention, and the gate."""
    a, u, lim = m.get("audit") or {}, m.get("utility") or {}, m.get("limits") or {}
    gate = m["gate"]
    L = [
        "### verify_dp",
        "",
        f"- gate: **{gate}**"
        + (" — targets withdrawn, nothing claiming privacy was published" if gate == "refuse" else "")
        + (
            f" (limits: DP attention error ≤ {_fmt(lim.get('max_rel_err'))} and below the uniform baseline"
            + (
                f", top-1 agreement ≥ {_fmt(lim['min_top1_agreement'])}"
                if lim.get("min_top1_agreement") is not None
                else ""
            )
            + ")"
            if lim
            else ""
        ),
        "",
        "| audit | result |",
        "|---|---|",
        f"| worst sensitivity found / bound | {_fmt(a.get('max_sensitivity_ratio'), 3)} (must be ≤ 1) |",
        f"| broken control (noise redrawn per query) flagged | {_fmt(a.get('broken_control_flagged'))} |",
        f"| released state unchanged after the adaptive query stream | {_fmt(a.get('state_hash_unchanged'))} |",
    ]
    if a.get("exact_delta") is not None:
        L += [
            f"| exact δ of the noise used | {_fmt(a['exact_delta'], 3)} |",
            f"| privacy-loss audit: ε measured (lower confidence bound) | {_fmt(a.get('epsilon_measured'), 3)} ({_fmt(a.get('epsilon_lower'), 3)}) |",
        ]
    elif a.get("note"):
        L.append(f"| note | {a['note']} |")
    L += [
        "",
        "Utility on public queries (computed from the private context: not covered by the guarantee):",
        "",
        "| measure | value |",
        "|---|---|",
        f"| relative error of DP context attention vs exact (mean over heads; worst head) | {_fmt(u.get('rel_err'), 3)} ({_fmt(u.get('rel_err_worst_head'), 3)}) |",
        f"| same for uniform attention over the context (baseline) | {_fmt(u.get('uniform_rel_err'), 3)} |",
        f"| next-token top-1 agreement with the exact-context model (worst target) | {_fmt(u.get('top1_agreement'), 3)} |",
    ]
    L += [f"| top-1 agreement, {k} | {_fmt(v, 3)} |" for k, v in (u.get("top1_per_target") or {}).items()]
    L += [f"| perplexity ratio DP / exact context, {k} | {_fmt(v, 4)} |" for k, v in (u.get("ppl_ratio") or {}).items()]
    if "queries" in u:
        L.append(f"| public query tokens | {u['queries']} |")
    return L + [""]
