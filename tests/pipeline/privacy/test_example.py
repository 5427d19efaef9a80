"""The private-context example (examples/private-context.yaml): its generator writes a decoder folder the loader
accepts and texts the config names; the config validates once they exist and fails in one line before. The full
run of the same path (a synthetic head-dim-2 decoder, ε = 16) is test_stages' usable-region test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.cli import main

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "private-context.yaml"


def test_example_config_refuses_in_one_line_until_generated_then_validates(tmp_path, capsys):
    from pipeline.privacy.demo import main as demo_main

    cfg = shutil.copy(EXAMPLE, tmp_path / "private-context.yaml")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "private-context/model" in err and "model.path" in err and "\n" not in err
    assert demo_main([str(tmp_path / "private-context"), "--context-words", "300"]) == 0
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "private_context, export, verify_dp" in out and "gpt2 text-generation" in out
    folder = tmp_path / "private-context"
    conf = json.loads((folder / "model" / "config.json").read_text())
    assert (conf["n_embd"] // conf["n_head"], conf["n_layer"], conf["n_positions"]) == (2, 1, 300 + 128)
    # the tokenizer's vocabulary comes from the public text only
    vocab = json.loads((folder / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    public_words = set((folder / "public.txt").read_text().split())
    assert set(vocab) - {"<unk>", "<s>", "</s>"} <= public_words
    assert len((folder / "context.txt").read_text().split()) == 301
