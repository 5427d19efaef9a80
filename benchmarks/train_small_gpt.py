"""Train a small GPT-2-style causal LM on real text, for perplexity benchmarks of pruning / recovery.

Data: ``../shared/data/fortunes.txt`` (one passage per line); the last 5% of lines are held out. A byte-level
BPE tokenizer (``tokenizers``, vocab ~4k) is trained in-script on the training lines only. Training samples
random windows of ``context + 1`` tokens from the training passages joined with ``<|endoftext|>`` (nanoGPT
style); held-out perplexity is ``exp(mean next-token NLL)`` over non-overlapping ``context``-token windows of
the held-out passages joined the same way (see ``heldout_perplexity``).

The result is cached outside the repo (default ``~/.cache/edgepipe/small-gpt/``): ``save_pretrained``
(safetensors) model + tokenizer + ``train_info.json`` (settings and their hash, steps, seconds, held-out
perplexity, command). A rerun with the same settings (and the same data file) skips training.

Usage:
    python benchmarks/train_small_gpt.py                 # train (or reuse the cache) and report
    python benchmarks/train_small_gpt.py --eval          # print held-out perplexity of the cached model
    python benchmarks/train_small_gpt.py --steps 200 --out /tmp/sg   # quick check of the script
    python benchmarks/train_small_gpt.py --recover-demo --demo-sparsity 0.7   # prune + pipeline.recover
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("train_small_gpt")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data" / "fortunes.txt"
DEFAULT_OUT = Path("~/.cache/edgepipe/small-gpt").expanduser()
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class Settings:
    """Everything that determines the trained weights; hashed to decide whether the cache is valid."""

    data_sha256: str
    holdout_fraction: float = 0.05
    vocab_size: int = 4096
    n_layer: int = 4
    # Sized for 2 shared CPU cores: hidden 256 measured 3.4 s/step under load vs 1.3 s/step at 128
    # (batch 16 x 128 tokens, 1 thread), so 128 gives ~600 steps (~5 epochs of the training text) in ~13 min.
    n_embd: int = 128
    n_head: int = 4
    context: int = 128
    dropout: float = 0.1
    batch_size: int = 16
    steps: int = 600
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    eval_every: int = 100
    seed: int = 0

    def digest(self) -> str:
        """Stable hash of the settings (sorted JSON)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_split(path: Path, holdout_fraction: float) -> tuple[list[str], list[str]]:
    """Lines of ``path`` (blank ones skipped) -> (train, heldout = the last ``holdout_fraction`` of lines)."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    n_hold = max(1, round(len(lines) * holdout_fraction))
    return lines[:-n_hold], lines[-n_hold:]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on ``texts`` -> a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as
    bos/eos/unk/pad (GPT-2 convention: one special token)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False)
    # model_input_names: a generic PreTrainedTokenizerFast also returns token_type_ids, and GPT-2 embeds
    # those with its word embedding (wte), so zeros would add wte[0] to every position.
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_input_names=["input_ids", "attention_mask"],
    )


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Passages joined with EOT (each passage followed by EOT) -> (N,) int64 token ids."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, stream: torch.Tensor, context: int, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``context`` tokens of ``stream``.

    Each window predicts its tokens 2..context from the preceding ones (no carried-over context), the usual
    fixed-window protocol; the trailing partial window is dropped.
    """
    model.eval()
    n_win = (stream.numel() - 1) // context
    if n_win < 1:
        raise ValueError(f"held-out stream of {stream.numel()} tokens is shorter than context={context}")
    windows = stream[: n_win * context].view(n_win, context)  # (W, T)
    nll, count = 0.0, 0
    for start in range(0, n_win, batch_size):
        x = windows[start : start + batch_size]
        logits = model(input_ids=x).logits  # (b, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def _lr_at(step: int, s: Settings) -> float:
    """Linear warmup, then cosine decay from lr to lr * min_lr_ratio at the last step."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(s: Settings, vocab: int, eot: int, n_head: int | None = None) -> torch.nn.Module:
    """The GPT-2 of ``s`` (``n_head`` overrides ``s.n_head``), freshly initialised from torch's global generator,
    with ``eot`` as its bos / eos / pad token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=s.context,
        n_embd=s.n_embd,
        n_layer=s.n_layer,
        n_head=s.n_head if n_head is None else n_head,
        resid_pdrop=s.dropout,
        embd_pdrop=s.dropout,
        attn_pdrop=s.dropout,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    return GPT2LMHeadModel(cfg)


def make_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only (nanoGPT): biases and LayerNorm gains stay
    undecayed. The learning rate is set per step by :func:`train_step`."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=(0.9, 0.95),
    )


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    train_ids: torch.Tensor,
    s: Settings,
    step: int,
    gen: torch.Generator,
) -> float:
    """One training step (0-based ``step``): the scheduled learning rate, ``s.batch_size`` random windows of
    ``s.context + 1`` tokens of ``train_ids`` drawn from ``gen``, next-token loss, gradient clipped to norm 1,
    AdamW update. Returns the step's training loss."""
    model.train()
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, s)
    starts = torch.randint(0, train_ids.numel() - s.context - 1, (s.batch_size,), generator=gen)
    xy = torch.stack([train_ids[i : i + s.context + 1] for i in starts.tolist()])  # (B, T+1)
    loss = model(input_ids=xy[:, :-1], labels=xy[:, :-1]).loss  # HF shifts labels internally
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def train(s: Settings, data: Path, out: Path, max_minutes: float, command: str) -> dict[str, Any]:
    """Train per ``s`` and save model, tokenizer and train_info.json into ``out``; returns the info dict."""
    torch.manual_seed(s.seed)
    train_texts, held_texts = read_split(data, s.holdout_fraction)
    t_tok = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, s.vocab_size)
    train_ids = token_stream(tokenizer, train_texts)  # (N_train,)
    held_ids = token_stream(tokenizer, held_texts)  # (N_held,)
    logger.info(
        "tokenizer: vocab %d in %.1fs; %d train passages / %d tokens, %d held-out passages / %d tokens",
        len(tokenizer),
        time.perf_counter() - t_tok,
        len(train_texts),
        train_ids.numel(),
        len(held_texts),
        held_ids.numel(),
    )
    model = build_model(s, len(tokenizer), tokenizer.convert_tokens_to_ids(EOT))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d layers, hidden %d, %d heads, %.2fM params", s.n_layer, s.n_embd, s.n_head, n_params / 1e6)
    opt = make_optimizer(model, s)
    gen = torch.Generator().manual_seed(s.seed)
    best_ppl, best_step, best_state = float("inf"), 0, None
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    step = 0
    stopped_early = False
    for step in range(1, s.steps + 1):
        loss = train_step(model, opt, train_ids, s, step - 1, gen)
        elapsed = time.perf_counter() - t0
        over_budget = elapsed > max_minutes * 60
        if step % s.eval_every == 0 or step == s.steps or over_budget:
            ppl = heldout_perplexity(model, held_ids, s.context)
            history.append({"step": step, "train_loss": loss, "heldout_ppl": ppl, "seconds": elapsed})
            logger.info("step %d/%d train loss %.3f held-out ppl %.2f (%.0fs)", step, s.steps, loss, ppl, elapsed)
            if ppl < best_ppl:  # keep the best checkpoint: 178k words overfit a 4-layer model within minutes
                best_ppl, best_step = ppl, step
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if over_budget:
            logger.warning("time budget of %.1f min reached at step %d; stopping", max_minutes, step)
            stopped_early = True
            break
    seconds = time.perf_counter() - t0
    assert best_state is not None
    model.load_state_dict(best_state)
    final_ppl = heldout_perplexity(model, held_ids, s.context)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "settings": asdict(s),
        "settings_hash": s.digest(),
        "data": str(data.resolve()),
        "steps": step,
        "best_step": best_step,
        "stopped_early": stopped_early,
        "seconds": round(seconds, 1),
        "heldout_ppl": final_ppl,
        "heldout_tokens": int(held_ids.numel()),
        "train_tokens": int(train_ids.numel()),
        "params": n_params,
        "threads": torch.get_num_threads(),
        "history": history,
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": " ".join(platform.uname()),
        "torch": torch.__version__,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def evaluate(out: Path, data: Path) -> dict[str, Any]:
    """Held-out perplexity of the cached model in ``out`` with its saved settings."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    info_path = out / "train_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"no trained model at '{out}' (missing train_info.json); train first")
    info = json.loads(info_path.read_text())
    s = info["settings"]
    _, held_texts = read_split(data, s["holdout_fraction"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = GPT2LMHeadModel.from_pretrained(out, use_safetensors=True)
    t0 = time.perf_counter()
    ppl = heldout_perplexity(model, token_stream(tokenizer, held_texts), s["context"])
    return {"heldout_ppl": ppl, "eval_seconds": round(time.perf_counter() - t0, 2), "trained": info}


def recover_demo(out: Path, data: Path, sparsity: float, steps: int, n_calib: int, lr: float) -> dict[str, Any]:
    """Magnitude-prune the cached model's block weights, distill it back with ``pipeline.recover.recover_``.

    Calibration: the first ``n_calib`` training passages (batches of 8, <= 64 tokens). Evaluation: the same
    held-out windows as ``heldout_perplexity`` plus ``heldout_metrics`` (top-1 agreement, KL) on held-out
    passages. Pruning is per weight tensor (smallest |w| zeroed) in every transformer block's Conv1D.
    """
    import copy

    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from pipeline.data import tokenize_batches
    from pipeline.recover import recover_

    info = json.loads((out / "train_info.json").read_text())
    cfg = info["settings"]
    train_texts, held_texts = read_split(data, cfg["holdout_fraction"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    teacher = GPT2LMHeadModel.from_pretrained(out, use_safetensors=True).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, mod in student.named_modules():
            if isinstance(mod, Conv1D) and ".h." in name:
                w = mod.weight
                k = int(w.numel() * sparsity)
                w.mul_(w.abs() > w.abs().flatten().kthvalue(k).values)
    held_stream = token_stream(tokenizer, held_texts)
    kw = {"batch_size": 8, "max_length": 64}
    calib = tokenize_batches(tokenizer, train_texts[:n_calib], **kw)
    held = tokenize_batches(tokenizer, held_texts[:128], **kw)
    ppl_dense = heldout_perplexity(teacher, held_stream, cfg["context"])
    ppl_pruned = heldout_perplexity(student, held_stream, cfg["context"])
    res = recover_(student, teacher, calib, steps=steps, lr=lr, heldout=held, seed=0)
    ppl_recovered = heldout_perplexity(student, held_stream, cfg["context"])
    zeros = sum(int((m.weight == 0).sum()) for n, m in student.named_modules() if isinstance(m, Conv1D) and ".h." in n)
    total = sum(m.weight.numel() for n, m in student.named_modules() if isinstance(m, Conv1D) and ".h." in n)
    return {
        "sparsity_after": zeros / total,
        "ppl_dense": ppl_dense,
        "ppl_pruned": ppl_pruned,
        "ppl_recovered": ppl_recovered,
        "recover_seconds": res.seconds,
        "steps": res.steps,
        "loss_first": res.loss_first,
        "loss_last": res.loss_last,
        "heldout_before": res.heldout_before,
        "heldout_after": res.heldout_after,
        "sparsity": sparsity,
        "lr": lr,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="one passage per line")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cache directory (outside the repo)")
    parser.add_argument("--eval", action="store_true", help="only print held-out perplexity of the cached model")
    parser.add_argument(
        "--recover-demo",
        action="store_true",
        help="prune the cached model by magnitude and distill it back with pipeline.recover (prints JSON)",
    )
    parser.add_argument("--demo-sparsity", type=float, default=0.5)
    parser.add_argument("--demo-steps", type=int, default=100)
    parser.add_argument("--demo-lr", type=float, default=1e-4)
    parser.add_argument("--demo-calib", type=int, default=256, help="calibration passages for the demo")
    parser.add_argument("--force", action="store_true", help="retrain even if the cache matches")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch intra-op threads (on an oversubscribed host 1 can be faster: threads wait on each other)",
    )
    parser.add_argument("--max-minutes", type=float, default=20.0, help="stop training after this wall time")
    defaults = Settings(data_sha256="")
    for name in (
        "vocab_size",
        "n_layer",
        "n_embd",
        "n_head",
        "context",
        "batch_size",
        "steps",
        "eval_every",
        "seed",
        "warmup",
    ):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr_ratio", "dropout", "weight_decay", "holdout_fraction"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    data = args.data.resolve()
    if not data.is_file():
        parser.error(f"data file not found: '{data}'")
    out = args.out.expanduser()

    if args.eval:
        res = evaluate(out, data)
        print(
            f"held-out perplexity: {res['heldout_ppl']:.3f} ({res['eval_seconds']}s; trained "
            f"{res['trained']['steps']} steps in {res['trained']['seconds']}s) [{out}]"
        )
        return 0

    if args.recover_demo:
        sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
        res = recover_demo(out, data, args.demo_sparsity, args.demo_steps, args.demo_calib, args.demo_lr)
        print(json.dumps(res, indent=2))
        return 0

    fields = {k: getattr(args, k) for k in Settings.__dataclass_fields__ if k != "data_sha256"}
    s = Settings(data_sha256=_sha256(data), **fields)
    info_path = out / "train_info.json"
    if info_path.is_file() and not args.force:
        cached = json.loads(info_path.read_text())
        if cached.get("settings_hash") == s.digest():
            print(
                f"cached model matches settings {s.digest()}: held-out perplexity {cached['heldout_ppl']:.3f} "
                f"({cached['steps']} steps, {cached['seconds']}s) [{out}]"
            )
            return 0
        logger.info("cache at %s has settings %s != %s; retraining", out, cached.get("settings_hash"), s.digest())
    command = " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])
    info = train(s, data, out, args.max_minutes, command)
    print(
        f"trained {info['steps']} steps (best {info['best_step']}) in {info['seconds']}s: held-out perplexity "
        f"{info['heldout_ppl']:.3f} [{out}]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
