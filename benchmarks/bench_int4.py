"""int4 weight-only (MatMulNBits) against int8 dynamic on the small GPT of ``train_small_gpt.py``.

Variants, all made by edgepipe's ``convert_precision`` from the same exported fp32 ONNX model (KV-cache I/O):
fp32; int8 dynamic as the quantize stage makes it for ``host-cpu`` (u8 weights, embeddings quantized); int4 RTN
/ HQQ / GPTQ at block 32 (the profiles' default), int4 RTN with other block sizes, accuracy levels, and the LM
head / embeddings kept out of int4.

Metrics:
- size of the model file;
- fidelity against the dense (fp32 ONNX) model on the held-out text of ``train_small_gpt.py`` (the last 5% of
  fortunes.txt, non-overlapping 128-token windows): next-token top-1 agreement and perplexity ratio
  (``runtimes.fidelity.lm_fidelity``, the numbers the ``validate`` gates read), and held-out perplexity;
- latency on this host, all sessions in ONE process with the timed runs interleaved round-robin (the machine is
  shared and noisy: compare ratios, not absolute ms): prefill (batch 1 x 128 tokens, empty cache) and one
  decode step (1 token on a 127-token cache), intra-op threads 2.

Run (after ``python benchmarks/train_small_gpt.py``):
    OMP_NUM_THREADS=2 python benchmarks/bench_int4.py [--rounds 40] [--out benchmarks/results/int4.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_small_gpt as tsg  # noqa: E402

import pipeline  # noqa: E402
from exporters.precision_registry import Int4Options  # noqa: E402
from exporters.quantize import convert_precision  # noqa: E402
from runtimes.fidelity import lm_fidelity  # noqa: E402
from runtimes.session import make_session  # noqa: E402

log = logging.getLogger("bench_int4")
CONTEXT = 128

#: name -> (precision, convert_precision keyword arguments)
VARIANTS: dict[str, tuple[str, dict]] = {
    "fp32": ("fp32", {}),
    "int8 dynamic (u8 weights, embeddings int8)": (
        "int8",
        {"weight_type": "u8", "int8_op_types": ("MatMul", "Gemm", "Gather")},
    ),
    # LM head int4 unless the name says otherwise (the quantize stage's default is an int8 head: the row marked
    # "stage default"); the profiles' default block 32 / rtn / accuracy level 4
    "int4 rtn b32 acc4, LM head int4": ("int4", {"int4": Int4Options(lm_head="int4")}),
    "int4 hqq b32 acc4, LM head int4": ("int4", {"int4": Int4Options(algorithm="hqq", lm_head="int4")}),
    "int4 gptq b32 acc4, LM head int4": ("int4", {"int4": Int4Options(algorithm="gptq", lm_head="int4")}),
    "int4 rtn b32 acc1 (fp32 compute), LM head int4": ("int4", {"int4": Int4Options(accuracy_level=1, lm_head="int4")}),
    "int4 rtn b16 acc4, LM head int4": ("int4", {"int4": Int4Options(block_size=16, lm_head="int4")}),
    "int4 rtn b128 acc4, LM head int4": ("int4", {"int4": Int4Options(block_size=128, lm_head="int4")}),
    "int4 rtn b32 acc4, LM head int8 (stage default)": ("int4", {"int4": Int4Options(lm_head="int8")}),
    "int4 rtn b32 acc4, LM head + embeddings fp32": ("int4", {"int4": Int4Options(lm_head="fp32", embeddings=False)}),
}


def _windows(tokenizer, texts: list[str], n: int | None) -> np.ndarray:
    """(W, CONTEXT) int64: non-overlapping windows of the texts joined with <|endoftext|> (as train_small_gpt)."""
    stream = tsg.token_stream(tokenizer, texts).numpy()
    w = len(stream) // CONTEXT
    out = stream[: w * CONTEXT].reshape(w, CONTEXT).astype(np.int64)
    return out[:n] if n else out


def _feeds(sess: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict:
    """Feeds for ids (B, S) after ``past`` (name -> (B, H, P, D)); empty cache when None."""
    b, s = ids.shape
    p = 0 if not past else next(iter(past.values())).shape[2]
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((b, p + s), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(p, p + s, dtype=np.int64), (b, 1))
        elif past:
            feeds[i.name] = past[i.name]
        else:  # past_key_values.{l}.{key,value}: (B, heads, 0, head_dim)
            feeds[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), np.float32)
    return feeds


def _session(path: Path, threads: int) -> ort.InferenceSession:
    """CPU session with ``threads`` intra-op threads that do not spin between runs: ten sessions in one process
    would otherwise keep idle worker threads spinning on the 2 cores while the timed session runs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in have) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=tsg.DEFAULT_OUT, help="train_small_gpt.py output folder")
    ap.add_argument("--data", type=Path, default=tsg.DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=40, help="interleaved timed rounds per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=0, help="held-out windows for fidelity (0 = all)")
    ap.add_argument("--calib", type=int, default=16, help="training windows for GPTQ calibration")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int4.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoTokenizer

    info = json.loads((args.model / "train_info.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    train_texts, held_texts = tsg.read_split(args.data, info["settings"]["holdout_fraction"])
    held = _windows(tokenizer, held_texts, args.windows or None)
    calib = _windows(tokenizer, train_texts[:400], args.calib)

    with tempfile.TemporaryDirectory(prefix="bench_int4.") as tmp:
        tmp = Path(tmp)
        pipeline.run(
            {"model": {"path": str(args.model)}, "targets": ["host-cpu"], "stages": [{"export": {}}]},
            workdir=tmp / "run",
            progress=False,
        )
        src = tmp / "run" / "host-cpu" / "model.onnx"
        probe = make_session(src, threads=1)
        calib_feeds = [_feeds(probe, calib[i : i + 1]) for i in range(len(calib))]
        paths: dict[str, Path] = {}
        sizes: dict[str, int] = {}
        convert_s: dict[str, float] = {}
        for name, (precision, kw) in VARIANTS.items():
            t0 = time.perf_counter()
            dst = tmp / f"v{len(paths)}" / "model.onnx"
            feeds = calib_feeds if kw.get("int4") is not None and kw["int4"].algorithm == "gptq" else None
            convert_precision(src, dst, precision, calibration_feeds=feeds, **kw)
            convert_s[name] = time.perf_counter() - t0
            paths[name] = dst
            sizes[name] = dst.stat().st_size
            log.info("%s: %.1f s, %d bytes", name, convert_s[name], dst.stat().st_size)

        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        # fidelity against the dense (fp32 ONNX) model, batches of 8 windows
        logits: dict[str, list[np.ndarray]] = {k: [] for k in sessions}
        for i in range(0, len(held), 8):
            ids = held[i : i + 8]
            for k, s in sessions.items():
                logits[k].append(s.run(["logits"], _feeds(s, ids))[0])
        ids_all = held
        mask = np.ones_like(ids_all)
        ref = np.concatenate(logits["fp32"])
        fid = {k: lm_fidelity(ref, np.concatenate(v), ids_all, mask) for k, v in logits.items()}

        # latency: prefill 1x128 and one decode step on a 127-token cache, interleaved round-robin
        prompt = held[:1]
        pre_feeds, dec_feeds = {}, {}
        for k, s in sessions.items():
            pre_feeds[k] = _feeds(s, prompt)
            out_names = [o.name for o in s.get_outputs()]
            outs = dict(zip(out_names, s.run(None, _feeds(s, prompt[:, :-1]))))
            past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
            dec_feeds[k] = _feeds(s, prompt[:, -1:], past)
        lat: dict[tuple[str, str], list[float]] = {}
        for _ in range(3):  # warm-up
            for k, s in sessions.items():
                s.run(None, pre_feeds[k])
                s.run(None, dec_feeds[k])
        order = list(sessions)
        rng = np.random.default_rng(0)
        for _ in range(args.rounds):
            rng.shuffle(order)  # a new order each round: no variant always follows the same neighbour
            for k in order:
                for phase, feeds_by in (("prefill", pre_feeds), ("decode", dec_feeds)):
                    t0 = time.perf_counter()
                    sessions[k].run(None, feeds_by[k])
                    lat.setdefault((k, phase), []).append((time.perf_counter() - t0) * 1e3)

    med = {key: float(np.median(v)) for key, v in lat.items()}
    int8 = "int8 dynamic (u8 weights, embeddings int8)"
    rows, results = [], {}
    for k in VARIANTS:
        f = fid[k]
        results[k] = {
            "size_bytes": sizes[k],
            "fidelity": f,
            "prefill_ms_p50": med[(k, "prefill")],
            "decode_ms_p50": med[(k, "decode")],
            "convert_s": convert_s[k],
        }
        rows.append(
            f"| {k} | {sizes[k] / 1e6:.3f} | {sizes[int8] / sizes[k]:.2f}x | {f['top1_agreement']:.4f} "
            f"| {f['ppl_ratio']:.4f} | {f['ppl']:.1f} | {med[(k, 'prefill')]:.2f} "
            f"| {med[(int8, 'prefill')] / med[(k, 'prefill')]:.2f}x | {med[(k, 'decode')]:.3f} "
            f"| {med[(int8, 'decode')] / med[(k, 'decode')]:.2f}x | {convert_s[k]:.1f} |"
        )
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    cmd = "OMP_NUM_THREADS=2 python benchmarks/bench_int4.py " + " ".join(sys.argv[1:])
    st = info["settings"]
    md = "\n".join(
        [
            "## int4 weight-only (MatMulNBits) vs int8 dynamic on the small GPT",
            "",
            f"- Command: `{cmd.strip()}`",
            f"- Host: `{uname}`, {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, CPU flags:"
            f" {_cpu_flags()}; Python {platform.python_version()}, onnxruntime {ort.__version__}",
            f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- Model: `train_small_gpt.py` GPT-2 ({st['n_layer']} layers, hidden {st['n_embd']}, vocab"
            f" {st['vocab_size']}, context {st['context']}), {info.get('steps')} steps, held-out ppl (PyTorch)"
            f" {info.get('heldout_ppl', float('nan')):.1f}; exported by edgepipe's export stage (host-cpu, KV cache I/O).",
            f"- Fidelity: {len(ids_all)} non-overlapping 128-token held-out windows ({ids_all.size:,} tokens),"
            " against the fp32 ONNX model: top-1 agreement and perplexity ratio as the validate gates compute"
            " them. GPTQ calibrated on"
            f" {len(calib)} training windows.",
            f"- Latency: median of {args.rounds} interleaved rounds (variant order shuffled each round), intra-op"
            f" threads {args.threads} without spinning, CPU EP, ORT_ENABLE_ALL; prefill = 1x128 tokens on an empty cache, decode = 1 token on a 127-token cache."
            f" Ratios are int8 time / variant time (> 1: faster than int8). Load average at the end: {load}"
            " (shared machine: compare ratios within this table).",
            "",
            "| variant | size MB | int8 size / size | top-1 agree | ppl ratio | ppl | prefill ms | vs int8"
            " | decode ms | vs int8 | convert s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(md)


if __name__ == "__main__":
    main()
