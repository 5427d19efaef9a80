"""Build the self-contained private-context example: a synthetic low-dimension decoder and its texts.

    python -m pipeline.privacy.demo examples/private-context       # then: edgepipe run examples/private-context.yaml

Writes, into the given folder (created; existing files of these names are replaced, nothing else is touched):

* ``model/``: a GPT-2 decoder, 1 layer, 4 heads of dimension 2 (width 8), random weights (seeded) with the
  query/key/value projections scaled by 8 so attention over the context is informative, and a word-level
  tokenizer built from the public text only (a vocabulary built from the private text would reveal its words);
* ``context.txt``: the "private" context, 8192 words drawn (seeded) from that vocabulary;
* ``public.txt``: public calibration passages (projection, public bounds, utility queries).

Why synthetic: the usable region of the DP release (arXiv 2407.14717; benchmarks/results/privacy.md) needs a small
head dimension and a large n·ε; no real checkpoint shipped with edgepipe is there (the default MiniLM is an
encoder, which private_context refuses; real GPT-2 heads at ε = 1 are refused by verify_dp's gate). This model
shows the passing path end to end; point the same YAML at your own decoder to see where it stands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["write_demo"]

# Public vocabulary (common English words): the tokenizer and both texts use only these.
_WORDS = (
    "the a an and or but if then so because when where while of to in on at by for with from about into over under "
    "after before between through during without within along across behind beyond near far up down out off "
    "i you he she it we they me him her us them my your his its our their this that these those who what which "
    "is are was were be been being have has had do does did will would can could should may might must shall "
    "time year day week month hour morning evening night home house room door window table chair bed kitchen "
    "city town road street car train bus ship plane station office school shop market bank park garden river "
    "sea lake hill mountain forest field tree flower grass sun moon star sky rain snow wind cloud fire water "
    "food bread milk tea coffee apple fruit rice meat fish egg sugar salt cake soup dinner lunch breakfast "
    "man woman child boy girl friend family mother father sister brother teacher doctor worker driver farmer "
    "good bad new old big small long short high low hot cold warm cool fast slow early late easy hard "
    "happy sad quiet loud bright dark clean dirty open closed full empty rich poor young strong weak "
    "go come see look find give take make know think say tell ask work play read write walk run sit stand "
    "eat drink sleep wait call help start stop keep leave bring buy sell pay meet learn teach build carry"
).split()


def _passages(rng: np.random.Generator, count: int, words: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS, words)) + " ." for _ in range(count)]


def _tokenizer(public: list[str]):
    """Word-level tokenizer over the public text's words (plus specials): offline, no download."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"])}
    for line in public:
        for w in line.split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        model_max_length=8192 + 128,
        model_input_names=["input_ids", "attention_mask"],
    )


def write_demo(out: Path, *, context_words: int = 8192, seed: int = 0, gain: float = 8.0) -> Path:
    """Write ``model/``, ``context.txt`` and ``public.txt`` under ``out`` (see the module doc). Returns ``out``.

    Raises:
        ValueError: ``out`` (or a file to write) is a symbolic link.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.artifact import atomic_write_text

    out = Path(out)
    for p in (out, out / "model", out / "context.txt", out / "public.txt"):
        if p.is_symlink():
            raise ValueError(f"{p}: is a symbolic link; edgepipe does not write through links")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    public = _passages(rng, 48, 24)
    context = " ".join(rng.choice(_WORDS, context_words)) + " ."
    tokenizer = _tokenizer(public)
    torch.manual_seed(seed)
    conf = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=8,
        n_layer=1,
        n_head=4,
        n_positions=context_words + 128,  # the context's positions + the device's own tokens
        bos_token_id=1,
        eos_token_id=2,
        architectures=["GPT2LMHeadModel"],
    )
    model = GPT2LMHeadModel(conf).eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(gain)  # (8, 24): q | k | v columns
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    atomic_write_text(out / "context.txt", context + "\n")
    atomic_write_text(out / "public.txt", "\n".join(public) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write (e.g. examples/private-context)")
    ap.add_argument("--context-words", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        path = write_demo(args.out, context_words=args.context_words, seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}/model, {path}/context.txt, {path}/public.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
