"""Issue 11 item 2: an encoder over 2 GiB in fp32 through export -> quantize -> validate -> benchmark -> bundle.

Builds the issue's model (BERT, vocab 250002, hidden 2304, 1 layer, 18 heads, FFN 256: ~2.4 GB of fp32 weights,
random, seeded) from the transformers config class, saved as safetensors with the packaged MiniLM tokenizer files
copied in (as users' folders come), then runs ``edgepipe run`` once per stage prefix in one run folder: the runner
reuses the finished stages from the folder, so run k measures stage k (plus loading what it needs). Each run is timed
by ``/usr/bin/time -v`` (peak RSS = "Maximum resident set size" of the whole process).

Usage (needs ~10 GB free memory and ~10 GB disk; check ``free -g`` first):

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python benchmarks/build_big_encoder.py --work /tmp/big-encoder

A medium model of the same vocabulary (fp32 ~400 MB, for busy hosts): ``--hidden 384 --heads 6``;
``--external-data-mb 100`` sends it through the external-data path as the 2.4 GB model goes; ``--stages 2`` stops
after quantize.

Prints a markdown fragment (command, host, date, load, per-stage wall time and peak RSS, file sizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=250002, hidden_size=2304, num_hidden_layers=1, num_attention_heads=18, intermediate_size=256)
STAGES = [
    ("export", "{export: {}}"),
    ("quantize", "{quantize: {precision: int8}}"),
    ("validate", "{validate: {min_cos_mean: null}}"),
    ("benchmark + bundle", "{benchmark: {runs: 10, warmup: 2, seq: 128}}"),
]


def build_model(out: Path, config: dict) -> Path:
    """Random-weight BERT of shape ``config`` (default: the issue's), saved with safetensors and the MiniLM tokenizer
    files."""
    import torch
    import transformers as tf

    from pipeline.models import default_model_path

    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(**config)).eval()
    model.save_pretrained(out, safe_serialization=True)
    del model
    tf.AutoTokenizer.from_pretrained(default_model_path(), trust_remote_code=False).save_pretrained(out)
    return out


def _time_v(field: str, text: str) -> str:
    m = re.search(rf"{re.escape(field)}: (.+)", text)
    return m.group(1).strip() if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/big-encoder"))
    ap.add_argument("--edgepipe", default=str(Path(sys.executable).with_name("edgepipe")))
    ap.add_argument("--hidden", type=int, default=CONFIG["hidden_size"], help="hidden size (vocab stays 250002)")
    ap.add_argument("--heads", type=int, default=CONFIG["num_attention_heads"])
    ap.add_argument("--external-data-mb", type=float, default=None, help="export.external_data_mb (default: its own)")
    ap.add_argument("--stages", type=int, default=len(STAGES), help="run the first N stages only")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, "hidden_size": args.hidden, "num_attention_heads": args.heads}
    stages = list(STAGES[: args.stages])
    if args.external_data_mb is not None:
        stages[0] = ("export", f"{{export: {{external_data_mb: {args.external_data_mb}}}}}")

    t0 = time.perf_counter()
    model = build_model(args.work / "model", config)
    build_s = time.perf_counter() - t0
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    rows = []
    print("| stage (run k: stages 1..k, earlier ones reused) | exit | wall h:mm:ss | peak RSS GiB |\n|---|---|---|---|")
    for k in range(1, len(stages) + 1):
        cfg = args.work / f"run{k}.yaml"
        cfg.write_text(
            f"model: {{path: {model}}}\n"
            "targets: [host-cpu]\n"
            "calibration: {samples: 8, heldout: 8, max_length: 128}\n"
            "stages:\n" + "".join(f"  - {s}\n" for _, s in stages[:k])
        )
        cmd = ["/usr/bin/time", "-v", args.edgepipe, "run", str(cfg), "--workdir", str(args.work / "run")]
        p = subprocess.run(cmd, capture_output=True, text=True)
        log = p.stdout + p.stderr
        (args.work / f"run{k}.log").write_text(log)
        rss_gb = int(_time_v("Maximum resident set size (kbytes)", log)) / 1024**2 if p.returncode == 0 else None
        rows.append(
            f"| {stages[k - 1][0]} | {p.returncode} | {_time_v('Elapsed (wall clock) time (h:mm:ss or m:ss)', log)} |"
            f" {f'{rss_gb:.2f}' if rss_gb is not None else 'n/a'} |"
        )
        print(rows[-1], flush=True)
        if p.returncode != 0:
            print(log[-3000:], file=sys.stderr)
            break
    run = args.work / "run" / "host-cpu"
    sizes = ", ".join(f"{f.name} {f.stat().st_size / 1e9:.2f} GB" for f in sorted(run.glob("model.onnx*")))
    bundle = sorted((run / "bundle").glob("model.onnx*")) if (run / "bundle").is_dir() else []
    uname = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        "\n".join(
            [
                "",
                f"- Command: `PYTHONPATH=$PWD OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python"
                f" benchmarks/build_big_encoder.py {' '.join(sys.argv[1:])}`",
                f"- Host: `{uname}`, nproc {os.cpu_count()}; date"
                f" {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; load average at the end {load}",
                f"- Model: BertModel {config}, random weights (seed 0), safetensors {weights / 1e9:.2f} GB;"
                f" built in {build_s:.0f} s",
                f"- host-cpu int8 artifact: {sizes}; bundle: {', '.join(f.name for f in bundle) or 'none'}",
            ]
        )
    )


if __name__ == "__main__":
    main()
