"""Issue 13 benchmarks: exact vs almost-linear attention gradients, beta per head, bounded-entry models, tensor attention.

Sections (each writes ``benchmarks/results/gradients_<section>.json`` and prints a markdown table):

* ``scaling``: one block and a 4-block causal transformer (pre-LayerNorm, residuals, MLP; ``CausalTransformer``,
  width 16, 4 heads of dim 4, entries bounded by normalized q/k with logit cap 0.5), float32, forward + backward
  of a squared-error loss, n = 1k ... 32k. Kernels: ``exact`` (softmax with the n x n matrices, textbook autograd),
  ``sdpa`` (torch's fused exact kernel, O(n) memory) and ``lowrank`` (polynomial degree 4 = 70 features, the
  factorized backward). Every point runs in its own subprocess (peak RSS = memory); gradients are saved and
  compared with the exact ones at the same n (``sdpa`` where ``exact`` does not fit in ``--mem-cap-gb``).
* ``tensor``: tensor attention, factorized (degree 3, d = 3) vs the dense O(n^3) reference, forward + backward.
* ``beta``: beta = max |q.k|/sqrt(d) per head on calibration text for MiniLM (and trained GPTs of ``bounded``).
* ``bounded``: small GPTs (``train_small_gpt.py`` data, tokenizer and protocol, shorter budget) unconstrained vs
  bounded-entry (normalized q/k, logit cap beta): held-out perplexity; then ``pipeline.recover.recover_`` steps
  at 4k - 32k tokens with exact vs polynomial attention on the bounded model.
* ``profile``: where the one-block fast gradient's time goes as n grows (wall vs process CPU time, page faults,
  chunk sizes, torch profiler self time per op).
* ``quality``: the same quality comparison alone, at a longer budget, with held-out checkpoints.

Usage:
    python benchmarks/bench_gradients.py scaling [--ns 1024 2048 ...] [--mem-cap-gb 5]
    python benchmarks/bench_gradients.py tensor
    python benchmarks/bench_gradients.py bounded [--steps 200]
    python benchmarks/bench_gradients.py quality [--steps 250] [--variants 4 32 32:0.5]
    python benchmarks/bench_gradients.py beta
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

WIDTH, HEADS, CAP, DEGREE = 16, 4, 0.5, 4


def _host() -> dict[str, Any]:
    return {
        "host": " ".join(platform.uname()),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "loadavg_at_end": os.getloadavg(),
    }


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gradients_{name}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


# ---------------------------------------------------------------------------------------------------- scaling
def _point(layers: int, kernel: str, n: int, out: Path) -> dict[str, Any]:
    """One measurement in this process: forward + backward time, peak RSS, gradients saved to ``out``."""
    from pipeline.lowrank import CausalTransformer

    torch.manual_seed(0)
    model = CausalTransformer(WIDTH, HEADS, layers, qk_bound=CAP)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, WIDTH, generator=gen).requires_grad_()
    target = torch.randn(1, n, WIDTH, generator=gen)
    base = _rss_mb()
    t0 = time.perf_counter()
    loss = ((model(x, kernel=kernel, degree=DEGREE) - target) ** 2).mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _rss_mb()
    grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in model.parameters()]).double().numpy()
    np.save(out, grads)
    return {"layers": layers, "kernel": kernel, "n": n, "seconds": seconds, "peak_mb": peak, "extra_mb": peak - base}


def _exact_fits(layers: int, n: int, cap_gb: float) -> bool:
    # textbook autograd keeps ~3 float32 n x n matrices per head and layer (logits, probabilities, their grad)
    return 3 * layers * HEADS * n * n * 4 / 2**30 <= cap_gb


def scaling(args) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            for n in args.ns:
                paths = {}
                for kernel in ("exact", "sdpa", "lowrank"):
                    if kernel == "exact" and not _exact_fits(layers, n, args.mem_cap_gb):
                        rows.append(
                            {"layers": layers, "kernel": kernel, "n": n, "skipped": f"needs > {args.mem_cap_gb} GB"}
                        )
                        continue
                    if kernel == "sdpa" and n > args.max_sdpa_n.get(layers, 10**9):
                        rows.append({"layers": layers, "kernel": kernel, "n": n, "skipped": "time budget"})
                        continue
                    p = Path(tmp) / f"{layers}-{kernel}-{n}.npy"
                    cmd = [sys.executable, __file__, "_point", str(layers), kernel, str(n), str(p)]
                    res = subprocess.run(
                        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                    )
                    if res.returncode != 0:
                        rows.append(
                            {
                                "layers": layers,
                                "kernel": kernel,
                                "n": n,
                                "skipped": res.stderr.strip().splitlines()[-1][:200],
                            }
                        )
                        continue
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                    paths[kernel] = p
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                ref = paths.get("exact") or paths.get("sdpa")
                if ref is not None and "lowrank" in paths:
                    g_ref, g_fast = np.load(ref), np.load(paths["lowrank"])
                    err = float(np.linalg.norm(g_fast - g_ref) / np.linalg.norm(g_ref))
                    for r in rows:
                        if r.get("layers") == layers and r.get("n") == n and r.get("kernel") == "lowrank":
                            r["rel_err"], r["rel_err_vs"] = err, "exact" if paths.get("exact") else "sdpa"
                if "exact" in paths and "sdpa" in paths:
                    for r in rows:
                        if r.get("layers") == layers and r.get("n") == n and r.get("kernel") == "sdpa":
                            r["rel_err"] = float(
                                np.linalg.norm(np.load(paths["sdpa"]) - np.load(paths["exact"]))
                                / np.linalg.norm(np.load(paths["exact"]))
                            )
    summary = {}
    for layers in args.layers:
        for kernel in ("exact", "sdpa", "lowrank"):
            pts = [
                (r["n"], r["seconds"])
                for r in rows
                if r.get("layers") == layers and r.get("kernel") == kernel and "seconds" in r
            ]
            if len(pts) >= 2:
                big = [p for p in pts if p[0] >= 4096] or pts
                summary[f"{layers}-{kernel}"] = {
                    "slope_all": _slope(*zip(*pts)),
                    "slope_n>=4k": _slope(*zip(*big)) if len(big) >= 2 else None,
                    "points": len(pts),
                }
    path = _save(
        "scaling",
        {
            "meta": _host(),
            "setup": {
                "width": WIDTH,
                "heads": HEADS,
                "head_dim": WIDTH // HEADS,
                "qk_cap": CAP,
                "degree": DEGREE,
                "dtype": "float32",
            },
            "rows": rows,
            "slopes": summary,
        },
    )
    print(json.dumps(summary, indent=1))
    print("wrote", path)


# ---------------------------------------------------------------------------------------------------- profile
def _fast_step(model, n: int, chunk: int, kernel: str = "lowrank") -> dict[str, float]:
    """One lowrank forward + backward at n tokens: wall s, process CPU s (excludes time spent waiting for a
    core on a shared machine), minor page faults (fresh memory touched), peak-RSS growth."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, n, WIDTH, generator=gen).requires_grad_()
    target = torch.randn(1, n, WIDTH, generator=gen)
    model.zero_grad(set_to_none=True)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0, t0 = time.process_time(), time.perf_counter()
    loss = ((model(x, kernel=kernel, degree=DEGREE, chunk=chunk) - target) ** 2).mean()
    loss.backward()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall": wall,
        "cpu": cpu,
        "user": r1.ru_utime - r0.ru_utime,
        "sys": r1.ru_stime - r0.ru_stime,  # kernel time: page faults of freshly mapped memory
        "minflt": r1.ru_minflt - r0.ru_minflt,
    }


def profile(args) -> None:
    """Where the one-block fast gradient's time goes as n grows: wall vs process-CPU time (best of
    ``--repeats``, sizes interleaved), page faults, chunk sizes, and the torch profiler's self CPU time per op
    at the smallest and largest n (which ops grow faster than n)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from pipeline.lowrank import CausalTransformer

    torch.manual_seed(0)
    model = CausalTransformer(WIDTH, HEADS, 1, qk_bound=CAP)
    _fast_step(model, 1024, args.chunks[0])  # warm-up (allocator, kernels)
    best: dict[tuple[int, int], dict[str, float]] = {}
    for _ in range(args.repeats):
        for chunk in args.chunks:
            for n in args.ns:
                r = _fast_step(model, n, chunk)
                b = best.setdefault((chunk, n), r)
                for k in ("wall", "cpu", "user", "sys"):
                    b[k] = min(b[k], r[k])
                b["minflt"] = min(b["minflt"], r["minflt"])
                print(json.dumps({"chunk": chunk, "n": n, **r}), flush=True)
    rows = [{"chunk": c, "n": n, **v} for (c, n), v in sorted(best.items())]
    exact_rows = []
    for n in args.exact_ns:  # textbook exact autograd (n x n matrices): only sizes that fit the memory budget
        runs = [_fast_step(model, n, 0, kernel="exact") for _ in range(args.repeats)]
        exact_rows.append({"n": n, **{k: min(r[k] for r in runs) for k in ("wall", "cpu", "user", "sys")}})
        print(json.dumps({"kernel": "exact", **exact_rows[-1]}), flush=True)
    slopes = {}
    for chunk in args.chunks:
        pts = [r for r in rows if r["chunk"] == chunk]
        ns = [r["n"] for r in pts]
        slopes[chunk] = {k: _slope(ns, [max(r[k], 1e-3) for r in pts]) for k in ("wall", "cpu", "user", "sys")}
        slopes[chunk]["minflt"] = _slope(ns, [max(r["minflt"], 1) for r in pts])
    ops: dict[int, dict[str, float]] = {}
    for n in (min(args.ns), max(args.ns)):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, n, WIDTH, generator=gen).requires_grad_()
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            ((model(x, kernel="lowrank", degree=DEGREE, chunk=args.chunks[0]) - 1.0) ** 2).mean().backward()
        ops[n] = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    lo, hi = min(args.ns), max(args.ns)
    growth = sorted(
        (
            {
                "op": k,
                f"self_s_{lo}": ops[lo].get(k, 0.0),
                f"self_s_{hi}": v,
                "ratio": v / max(ops[lo].get(k, 0.0), 1e-9),
            }
            for k, v in ops[hi].items()
            if v > 0.01 * sum(ops[hi].values())
        ),
        key=lambda r: -r[f"self_s_{hi}"],
    )
    out = {
        "meta": _host(),
        "setup": {
            "width": WIDTH,
            "heads": HEADS,
            "degree": DEGREE,
            "qk_cap": CAP,
            "layers": 1,
            "repeats": args.repeats,
        },
        "rows": rows,
        "slopes": slopes,
        "exact_rows": exact_rows,
        "exact_slopes": {k: _slope([r["n"] for r in exact_rows], [r[k] for r in exact_rows]) for k in ("wall", "cpu")}
        if len(exact_rows) >= 2
        else None,
        "profiler": {"n": [lo, hi], "total_self_s": [sum(ops[lo].values()), sum(ops[hi].values())], "ops": growth},
    }
    print(json.dumps({"slopes": slopes, "profiler_total": out["profiler"]["total_self_s"]}, indent=1))
    for r in growth[:12]:
        print(json.dumps(r))
    print("wrote", _save(args.name, out))


# ---------------------------------------------------------------------------------------------------- tensor
def tensor(args) -> None:
    from pipeline.lowrank import taylor_error_bound, tensor_attention, tensor_attention_ref

    d, deg, bound = 3, 3, 0.8
    rows = []
    warm = [torch.rand(1, 64, d).requires_grad_() for _ in range(5)]
    tensor_attention(*warm, degree=deg).sum().backward()  # first-call overheads out of the table
    for n in args.ns:
        gen = torch.Generator().manual_seed(n)
        ts = [((torch.rand(1, n, d, generator=gen) * 2 - 1) * bound).requires_grad_() for _ in range(5)]
        g = torch.randn(1, n, d, generator=gen)
        times = []
        for _ in range(args.repeats):  # best of a few: the fast path takes milliseconds on a busy machine
            for t in ts:
                t.grad = None
            t0 = time.perf_counter()
            y = tensor_attention(*ts, degree=deg)
            y.backward(g)
            times.append(time.perf_counter() - t0)
        t_fast = min(times)
        fast_grads = torch.cat([t.grad.flatten() for t in ts]).double()
        row = {"n": n, "fast_seconds": t_fast}
        if n <= args.max_dense_n:
            for t in ts:
                t.grad = None
            t0 = time.perf_counter()
            yr = tensor_attention_ref(*[t.float() for t in ts])  # float32 dense, autograd
            yr.backward(g)
            row["dense_seconds"] = time.perf_counter() - t0
            dense_grads = torch.cat([t.grad.flatten() for t in ts]).double()
            row["grad_rel_err"] = float((fast_grads - dense_grads).norm() / dense_grads.norm())
            row["out_max_err"] = float((y.detach().double() - yr.detach().double()).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    beta = bound**3  # |scale sum_t q k1 k2| <= (1/d) d B^3
    fast = [(r["n"], r["fast_seconds"]) for r in rows]
    dense = [(r["n"], r["dense_seconds"]) for r in rows if "dense_seconds" in r]
    big = [p for p in fast if p[0] >= 4096]
    summary = {
        "fast_slope": _slope(*zip(*fast)),
        "fast_slope_n>=4k": _slope(*zip(*big)) if len(big) >= 2 else None,
        "dense_slope": _slope(*zip(*dense)) if len(dense) >= 2 else None,
        "beta_bound": beta,
        "kernel_eps_bound": taylor_error_bound(beta, deg),
    }
    path = _save(
        "tensor",
        {
            "meta": _host(),
            "setup": {"d": d, "degree": deg, "entries": bound, "dtype": "float32"},
            "rows": rows,
            "summary": summary,
        },
    )
    print(json.dumps(summary, indent=1))
    print("wrote", path)


# ---------------------------------------------------------------------------------------------------- beta
def _head_betas(model, batches) -> list[list[tuple[float, float]]]:
    from pipeline.kernels import swap_attention_
    from pipeline.lowrank.certify import BetaProbe, install_attention_probe

    swap_attention_(model, kernel="naive")
    probes: list[BetaProbe] = []
    install_attention_probe(model, lambda layer, inner: probes.append(BetaProbe(inner)) or probes[-1])
    with torch.no_grad():
        for b in batches:
            model(**b)
    return [p.stats() for p in probes]


def _beta_summary(stats, head_dim: int, eps: float = 1e-3) -> dict[str, Any]:
    from pipeline.lowrank import degree_for, feature_count

    betas = [b for layer in stats for b, _ in layer]
    degs = [degree_for(b, eps) for b in betas]
    return {
        "heads": len(betas),
        "beta_min": min(betas),
        "beta_median": float(np.median(betas)),
        "beta_max": max(betas),
        "p99_median": float(np.median([p for layer in stats for _, p in layer])),
        "degree_min": min(degs),
        "degree_max": max(degs),
        "features_min": feature_count(head_dim, min(degs)),
        "per_layer_max": [max(b for b, _ in layer) for layer in stats],
    }


def beta(args) -> None:
    from pipeline.data import load_texts, tokenize_batches
    from pipeline.models import default_model_path, load_model

    loaded = load_model(default_model_path())
    texts = load_texts(None)[:32]
    batches = tokenize_batches(loaded.tokenizer, texts, batch_size=8, max_length=128)
    stats = _head_betas(loaded.model, batches)
    out = {"meta": _host(), "minilm": {**_beta_summary(stats, 32), "per_head": stats, "passages": len(texts)}}
    path = _save("beta", out)
    print(json.dumps({k: v for k, v in out["minilm"].items() if k != "per_head"}, indent=1))
    print("wrote", path)


# ---------------------------------------------------------------------------------------------------- bounded
def bounded(args) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_small_gpt as tsg

    from pipeline.lowrank import feature_count
    from pipeline.lowrank.bounded import bounded_degree

    data = Path(args.data)
    s = tsg.Settings(data_sha256="", steps=args.steps)
    train_texts, held_texts = tsg.read_split(data, s.holdout_fraction)
    tokenizer = tsg.train_tokenizer(train_texts, s.vocab_size)
    train_ids, held_ids = tsg.token_stream(tokenizer, train_texts), tsg.token_stream(tokenizer, held_texts)
    eot = tokenizer.convert_tokens_to_ids(tsg.EOT)
    variants = [("unconstrained", 4, None), ("unconstrained", 32, None), ("bounded", 32, 0.5), ("bounded", 32, 2.0)]
    rows, models = [], {}
    for kind, n_head, cap in variants:
        model, seconds = _train_gpt(tsg, s, len(tokenizer), eot, train_ids, n_head, cap)
        ppl = tsg.heldout_perplexity(model, held_ids, s.context)
        row = {
            "attention": kind,
            "heads": n_head,
            "head_dim": s.n_embd // n_head,
            "beta_cap": cap,
            "steps": s.steps,
            "train_seconds": round(seconds, 1),
            "heldout_ppl": ppl,
        }
        if cap is not None:
            row["certified_degree_1e-3"] = bounded_degree(cap, 1e-3)
            row["features"] = feature_count(s.n_embd // n_head, row["certified_degree_1e-3"])
        rows.append(row)
        models[(kind, n_head, cap)] = model.eval()
        print(json.dumps(row), flush=True)

    # beta per head of the unconstrained small GPT (4 heads of 32) on held-out windows
    unc = models[("unconstrained", 4, None)]
    windows = held_ids[: (held_ids.numel() // s.context) * s.context].view(-1, s.context)[:16]
    batches = [
        {"input_ids": windows[i : i + 8], "attention_mask": torch.ones_like(windows[i : i + 8])}
        for i in range(0, windows.shape[0], 8)
    ]
    gpt_stats = _head_betas(unc, batches)

    # long-sequence recover steps on the bounded model (32 heads of 4, cap 0.5): exact SDPA vs polynomial kernel
    src = models[("bounded", 32, 0.5)]
    cert, rec_rows, deg = _certify_and_recover(src, train_ids, args)
    out = {
        "meta": _host(),
        "settings": {**{k: v for k, v in vars(s).items() if k != "data_sha256"}},
        "quality": rows,
        "small_gpt_beta": {**_beta_summary(gpt_stats, s.n_embd // 4), "per_head": gpt_stats},
        "certificate": {"degree": deg, "kernel_eps": 1e-3, "rows": cert},
        "recover": {"degree": deg, "steps": args.recover_steps, "rows": rec_rows},
    }
    path = _save("bounded", out)
    print("wrote", path)


def _train_gpt(tsg, s, vocab: int, eot: int, train_ids, n_head: int, cap, on_step=None):
    """The small GPT of ``train_small_gpt.py`` (its settings ``s``, data order, schedule and optimizer), with
    ``n_head`` heads and, if ``cap``, bounded-entry attention. ``on_step(step, model)`` runs after each step
    (1-based; held-out checkpoints). Returns (model in eval mode, training seconds, excluding ``on_step``)."""
    from pipeline.lowrank.bounded import bound_attention_

    torch.manual_seed(s.seed)
    model = tsg.build_model(s, vocab, eot, n_head=n_head)
    if cap is not None:
        bound_attention_(model, beta=cap)
    opt = tsg.make_optimizer(model, s)
    gen = torch.Generator().manual_seed(s.seed)
    t0, paused = time.perf_counter(), 0.0
    for step in range(s.steps):
        tsg.train_step(model, opt, train_ids, s, step, gen)
        if on_step is not None:
            t1 = time.perf_counter()
            on_step(step + 1, model)
            paused += time.perf_counter() - t1
    return model.eval(), time.perf_counter() - t0 - paused


def quality(args) -> None:
    """Held-out perplexity of bounded-entry vs unconstrained small GPTs at a longer budget (``--steps``), with
    held-out checkpoints every ``--eval-every`` steps (does the bound's cost grow as attention sharpens?)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_small_gpt as tsg

    from pipeline.lowrank import feature_count
    from pipeline.lowrank.bounded import bounded_degree

    s = tsg.Settings(data_sha256="", steps=args.steps)
    train_texts, held_texts = tsg.read_split(Path(args.data), s.holdout_fraction)
    tokenizer = tsg.train_tokenizer(train_texts, s.vocab_size)
    train_ids, held_ids = tsg.token_stream(tokenizer, train_texts), tsg.token_stream(tokenizer, held_texts)
    eot = tokenizer.convert_tokens_to_ids(tsg.EOT)
    rows = []
    for spec in args.variants:  # "HEADS" or "HEADS:CAP"
        n_head, _, cap_s = spec.partition(":")
        n_head, cap = int(n_head), (float(cap_s) if cap_s else None)
        curve: list[tuple[int, float]] = []

        def checkpoint(step: int, model, curve=curve, tag=(n_head, cap)) -> None:
            if step % args.eval_every == 0 and step != s.steps:
                curve.append((step, tsg.heldout_perplexity(model, held_ids, s.context)))
                print(
                    json.dumps({"heads": tag[0], "beta_cap": tag[1], "step": step, "heldout_ppl": curve[-1][1]}),
                    flush=True,
                )

        model, seconds = _train_gpt(tsg, s, len(tokenizer), eot, train_ids, n_head, cap, on_step=checkpoint)
        curve.append((s.steps, tsg.heldout_perplexity(model, held_ids, s.context)))
        row = {
            "attention": "unconstrained" if cap is None else "bounded",
            "heads": n_head,
            "head_dim": s.n_embd // n_head,
            "beta_cap": cap,
            "steps": s.steps,
            "train_seconds": round(seconds, 1),
            "heldout_ppl": curve[-1][1],
            "heldout_curve": curve,
        }
        if cap is not None:
            row["certified_degree_1e-3"] = bounded_degree(cap, 1e-3)
            row["features"] = feature_count(s.n_embd // n_head, row["certified_degree_1e-3"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    settings = {k: v for k, v in vars(s).items() if k != "data_sha256"}
    print("wrote", _save(args.name, {"meta": _host(), "settings": settings, "rows": rows}))


def small_gpt_beta(args) -> None:
    """beta per head of the unconstrained small GPT (train_small_gpt.py settings, ``--steps``) on held-out windows."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_small_gpt as tsg

    s = tsg.Settings(data_sha256="", steps=args.steps)
    train_texts, held_texts = tsg.read_split(Path(args.data), s.holdout_fraction)
    tokenizer = tsg.train_tokenizer(train_texts, s.vocab_size)
    train_ids, held_ids = tsg.token_stream(tokenizer, train_texts), tsg.token_stream(tokenizer, held_texts)
    model, seconds = _train_gpt(
        tsg, s, len(tokenizer), tokenizer.convert_tokens_to_ids(tsg.EOT), train_ids, s.n_head, None
    )
    ppl = tsg.heldout_perplexity(model, held_ids, s.context)
    windows = held_ids[: (held_ids.numel() // s.context) * s.context].view(-1, s.context)[:16]
    batches = [
        {"input_ids": windows[i : i + 8], "attention_mask": torch.ones_like(windows[i : i + 8])}
        for i in range(0, windows.shape[0], 8)
    ]
    stats = _head_betas(model, batches)
    out = {
        "meta": _host(),
        "steps": s.steps,
        "train_seconds": seconds,
        "heldout_ppl": ppl,
        **_beta_summary(stats, s.n_embd // s.n_head),
        "per_head": stats,
    }
    print(json.dumps({k: v for k, v in out.items() if k not in ("per_head", "meta")}))
    print("wrote", _save("small_gpt_beta", out))


def _certify_and_recover(src, train_ids, args):
    """Whole-model gradient of a bounded GPT-2 (cap 0.5), exact SDPA vs polynomial kernel, at ``args.certify_ns``;
    then ``recover_`` steps (teacher = student = the same model, KL on logits) at ``args.recover_ns``."""
    from pipeline.lowrank.bounded import bound_attention_, bounded_degree
    from pipeline.recover import recover_

    deg = bounded_degree(0.5, 1e-3)
    cert = []
    for n in args.certify_ns:
        grads = []
        for mode in ("exact", "lowrank"):
            m = _long_copy(src, n)
            bound_attention_(m, beta=0.5, degree=deg if mode == "lowrank" else None)
            ids = _ids(train_ids, n)
            t0 = time.perf_counter()
            m(input_ids=ids, labels=ids).loss.backward()
            grads.append(
                (torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]), time.perf_counter() - t0)
            )
        (ge, te), (gf, tf) = grads
        cert.append(
            {"n": n, "rel_err": float((gf - ge).norm() / ge.norm()), "exact_seconds": te, "lowrank_seconds": tf}
        )
        print(json.dumps(cert[-1]), flush=True)
    rec_rows = []
    for n in args.recover_ns:
        res_n = {"n": n}
        for mode in ("exact", "lowrank"):
            if mode == "exact" and n > args.max_exact_recover_n:
                res_n["exact_seconds_per_step"] = None
                continue
            student, teacher = (_long_copy(src, n) for _ in range(2))
            with torch.no_grad():  # the student differs from the teacher (as a pruned model would): 2% weight noise
                gen = torch.Generator().manual_seed(0)
                for p in student.transformer.h.parameters():
                    p.mul_(1 + 0.02 * torch.randn(p.shape, generator=gen))
            for m in (student, teacher):
                bound_attention_(m, beta=0.5, degree=deg if mode == "lowrank" else None)
            ids = _ids(train_ids, n)
            batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
            res = recover_(
                student,
                teacher,
                batch,
                steps=args.recover_steps,
                lr=1e-4,
                loss="kl_logits",
                heldout=None,
                freeze_embeddings=True,
            )
            res_n[f"{mode}_seconds_per_step"] = res.seconds / res.steps
            res_n[f"{mode}_loss_first"] = res.loss_first
        rec_rows.append(res_n)
        print(json.dumps(res_n), flush=True)
    return cert, rec_rows, deg


def _ids(stream, n: int):
    """(1, n) ids: the first n tokens of the stream, repeated if it is shorter."""
    reps = -(-n // stream.numel())
    return stream.repeat(reps)[:n][None]


def bounded_speed(args) -> None:
    """Certificate and recover timing on a freshly initialized bounded GPT-2 of the trained architecture (the cap
    bounds every logit whatever the weights, so the regime does not depend on training)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    src = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=128, n_embd=128, n_layer=4, n_head=32)).eval()
    ids = torch.randint(0, 4096, (70000,), generator=torch.Generator().manual_seed(0))
    cert, rec_rows, deg = _certify_and_recover(src, ids, args)
    path = _save(
        "bounded_speed",
        {
            "meta": _host(),
            "model": "GPT-2, 4 layers, width 128, 32 heads of 4, random init, cap 0.5",
            "certificate": {"degree": deg, "kernel_eps": 1e-3, "rows": cert},
            "recover": {"degree": deg, "steps": args.recover_steps, "rows": rec_rows},
        },
    )
    print("wrote", path)


def _long_copy(model, n: int):
    """A copy of a trained GPT-2 whose position table is tiled to ``n`` rows (row i = trained row i mod context):
    for timing long sequences only; quality beyond the trained context is not measured."""
    from transformers import GPT2LMHeadModel

    cfg = model.config.to_dict()
    ctx = model.config.n_positions
    cfg.update(n_positions=n, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    from transformers import GPT2Config

    new = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in cfg.items() if k not in ("_attn_implementation_autoset",)}))
    state = {k: v for k, v in model.state_dict().items() if k != "transformer.wpe.weight"}
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        idx = torch.arange(n) % ctx
        new.transformer.wpe.weight.copy_(model.transformer.wpe.weight[idx])
    return new.eval()


def _fmt(x, nd=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}g}"
    return str(x)


def report(args) -> None:
    """Markdown tables from the saved JSON results (what RESULTS.md quotes)."""
    out = []
    sc = RESULTS / "gradients_scaling.json"
    if sc.is_file():
        d = json.loads(sc.read_text())
        for layers in sorted({r["layers"] for r in d["rows"]}):
            out.append(
                f"\n{layers} block(s): seconds (forward + backward), extra peak RSS MB, relative gradient error of lowrank\n"
            )
            out.append(
                "| n | exact s | exact MB | sdpa s | sdpa MB | lowrank s | lowrank MB | lowrank rel err (vs) | exact / lowrank | sdpa / lowrank |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for n in sorted({r["n"] for r in d["rows"] if r["layers"] == layers}):
                by = {r["kernel"]: r for r in d["rows"] if r["layers"] == layers and r["n"] == n}
                e, sd, lr = by.get("exact", {}), by.get("sdpa", {}), by.get("lowrank", {})
                ratio = lambda a, b: _fmt(a["seconds"] / b["seconds"]) if "seconds" in a and "seconds" in b else "n/a"  # noqa: E731
                out.append(
                    f"| {n} | {_fmt(e.get('seconds'))} | {_fmt(e.get('extra_mb'), 4)} | {_fmt(sd.get('seconds'))} | {_fmt(sd.get('extra_mb'), 4)} | "
                    f"{_fmt(lr.get('seconds'))} | {_fmt(lr.get('extra_mb'), 4)} | {_fmt(lr.get('rel_err'), 2)} ({lr.get('rel_err_vs', '-')}) | {ratio(e, lr)} | {ratio(sd, lr)} |"
                )
        out.append(
            "\nlog-log slopes of time in n: "
            + json.dumps(
                {
                    k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                    for k, v in d["slopes"].items()
                }
            )
        )
    te = RESULTS / "gradients_tensor.json"
    if te.is_file():
        d = json.loads(te.read_text())
        out.append("\nTensor attention (d = 3, degree 3, entries <= 0.8, float32), forward + backward\n")
        out.append("| n | factorized s | dense O(n^3) s | dense / factorized | gradient rel err | output max err |")
        out.append("|---|---|---|---|---|---|")
        for r in d["rows"]:
            ratio = _fmt(r["dense_seconds"] / r["fast_seconds"]) if "dense_seconds" in r else "n/a"
            out.append(
                f"| {r['n']} | {_fmt(r['fast_seconds'])} | {_fmt(r.get('dense_seconds'))} | {ratio} | {_fmt(r.get('grad_rel_err'), 2)} | {_fmt(r.get('out_max_err'), 2)} |"
            )
        out.append("\n" + json.dumps(d["summary"]))
    for name in ("beta", "bounded"):
        f = RESULTS / f"gradients_{name}.json"
        if f.is_file():
            d = json.loads(f.read_text())
            out.append(
                f"\n{name}: " + json.dumps({k: v for k, v in d.items() if k not in ("meta",)}, default=str)[:3000]
            )
    print("\n".join(out))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_point":
        layers, kernel, n, out = int(argv[1]), argv[2], int(argv[3]), Path(argv[4])
        torch.set_num_threads(1)
        print(json.dumps(_point(layers, kernel, n, out)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="section", required=True)
    sc = sub.add_parser("scaling")
    sc.add_argument("--layers", type=int, nargs="+", default=[1, 4])
    sc.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    sc.add_argument("--mem-cap-gb", type=float, default=5.0)
    sc.add_argument("--max-sdpa-n", type=json.loads, default={}, help="JSON {layers: max n} for the sdpa kernel")
    te = sub.add_parser("tensor")
    te.add_argument("--ns", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536])
    te.add_argument("--max-dense-n", type=int, default=256)
    te.add_argument("--repeats", type=int, default=3)
    pr = sub.add_parser("profile")
    pr.add_argument("--ns", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    pr.add_argument("--chunks", type=int, nargs="+", default=[32, 128])
    pr.add_argument("--repeats", type=int, default=3)
    pr.add_argument("--exact-ns", type=int, nargs="*", default=[2048, 4096, 5792], help="textbook exact autograd")
    pr.add_argument("--name", default="profile", help="results file gradients_<name>.json")
    sub.add_parser("beta")
    sub.add_parser("report")
    sg = sub.add_parser("small-gpt-beta")
    sg.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fortunes.txt"))
    sg.add_argument("--steps", type=int, default=80)
    bs = sub.add_parser("bounded-speed")
    bs.add_argument("--recover-ns", type=int, nargs="+", default=[4096, 8192, 16384])
    bs.add_argument("--max-exact-recover-n", type=int, default=8192)
    bs.add_argument("--recover-steps", type=int, default=2)
    bs.add_argument("--certify-ns", type=int, nargs="+", default=[4096])
    qu = sub.add_parser("quality")
    qu.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fortunes.txt"))
    qu.add_argument("--steps", type=int, default=250)
    qu.add_argument("--eval-every", type=int, default=50)
    qu.add_argument(
        "--variants", nargs="+", default=["4", "32", "32:0.5"], help="HEADS or HEADS:CAP (bounded, logit cap CAP)"
    )
    qu.add_argument("--name", default="quality", help="results file gradients_<name>.json")
    bo = sub.add_parser("bounded")
    bo.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fortunes.txt"))
    bo.add_argument("--steps", type=int, default=200)
    bo.add_argument("--recover-ns", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    bo.add_argument("--max-exact-recover-n", type=int, default=8192)
    bo.add_argument("--recover-steps", type=int, default=2)
    bo.add_argument("--certify-ns", type=int, nargs="+", default=[4096])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if getattr(args, "max_sdpa_n", None):
        args.max_sdpa_n = {int(k): v for k, v in args.max_sdpa_n.items()}
    {
        "scaling": scaling,
        "tensor": tensor,
        "beta": beta,
        "bounded": bounded,
        "bounded-speed": bounded_speed,
        "quality": quality,
        "profile": profile,
        "small-gpt-beta": small_gpt_beta,
        "report": report,
    }[args.section](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
