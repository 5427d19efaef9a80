"""A battery of bad and hostile inputs (issue 10): configs, model folders, calibration text, target profiles,
run folders and command-line arguments.

Every case runs the CLI in-process (``pipeline.cli.main(argv)``) and checks, as one contract:

- exit code 2 with exactly one line on stderr, ``edgepipe: error: ...``, naming the cause (and where), no
  traceback -- or the correct success where the input is actually valid;
- no file that edgepipe did not create was changed, created or removed (the whole case folder is hashed
  before and after, links included, without following them);
- no pickle reached an unpickler (``torch.load`` and ``pickle`` are guarded for the duration of the call);
- nothing from a model folder ran (planted Python writes a marker file when imported).

Most cases are refused by the checks that need no weights, so they also hold for ``edgepipe validate``: the
``validate``-and-``run`` cases run both commands and expect the same line.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parents[2]
CALIB = "\n".join(f"passage number {i} about the quick brown fox and the lazy dog" for i in range(40)) + "\n"
SMALL = "calibration: {file: calib.txt, samples: 4, heldout: 8, max_length: 16}\n"


# --------------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root`` (links not followed): kind, mode and content hash or link target."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class _Guard:
    """Records every attempt to unpickle while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch
        import torch.serialization

        self.calls: list[str] = []

        def trap(name: str) -> Callable[..., Any]:
            def f(*a: Any, **k: Any) -> Any:
                self.calls.append(name)
                raise RuntimeError(f"test guard: {name} called")

            return f

        for mod, attr in (
            (torch, "load"),
            (torch.serialization, "load"),
            (pickle, "load"),
            (pickle, "loads"),
            (pickle, "Unpickler"),
        ):
            monkeypatch.setattr(mod, attr, trap(f"{mod.__name__}.{attr}"))


@pytest.fixture
def guard(monkeypatch):
    g = _Guard(monkeypatch)
    yield g
    assert not g.calls, f"an unpickler was reached: {g.calls}"


def run_cli(capsys, argv: list[str], cwd: Path | None = None) -> tuple[int, str, str]:
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, fragments: tuple[str, ...]) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("edgepipe: error:"), line
    assert len(line) < 1500, line[:300]
    for frag in fragments:
        assert frag in line, f"{frag!r} not in {line!r}"
    return line


# --------------------------------------------------------------------------------------------- the fixtures


@pytest.fixture(scope="module")
def base_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny BERT, and a copy without tokenizer files; each case copies what it needs."""
    notok = tmp_path_factory.mktemp("hostile-models") / "bert-notok"
    shutil.copytree(tiny_models["bert"], notok)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "special_tokens_map.json"):
        (notok / name).unlink(missing_ok=True)
    return {"bert": tiny_models["bert"], "bert-notok": notok}


@dataclass
class Case:
    """A bad input: files to lay out under the case folder, the command, what the one line must say."""

    files: dict[str, Any] = field(default_factory=dict)  # rel path -> str | bytes | callable(path) | None (dir)
    argv: tuple[str, ...] = ("validate", "c.yaml")
    fragments: tuple[str, ...] = ()
    model: str | None = "bert"  # copied to ./model (None = no model folder)
    both: bool = False  # also `run` (must give the same line)
    ok: bool = False  # a valid input: exit 0


def _cfg(body: str, targets: str = "[host-cpu]") -> str:
    return f"model: {{path: model}}\ntargets: {targets}\n{SMALL}{body}"


def _json_edit(**kw: Any) -> Callable[[Path], None]:
    def f(p: Path) -> None:
        data = json.loads(p.read_text())
        for k, v in kw.items():
            if v is _DEL:
                data.pop(k, None)
            else:
                data[k] = v
        p.write_text(json.dumps(data))

    return f


_DEL = object()
_PLANT = "import pathlib; pathlib.Path(__file__).with_name('EXECUTED').write_text('pwned')\n"
_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    + "stages: [*i]\n"
)


def _profile(**kw: Any) -> str:
    import yaml

    from targets import load_target

    data = load_target("host-cpu").model_dump(mode="json")
    data.update(kw)
    return yaml.safe_dump(data)


def _index(weight_map: dict[str, str]) -> str:
    return json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})


def _shard_setup(shard: str, keep_safetensors: bool = False) -> Callable[[Path], None]:
    """Turn ./model into an indexed checkpoint whose shards are named ``shard``."""

    def f(model: Path) -> None:
        from safetensors.torch import load_file

        sd = load_file(model / "model.safetensors")
        if shard.endswith(".bin"):
            (model / shard).write_bytes(b"\x80\x04K\x01.")  # a valid pickle: an unpickler would accept it
        (model / "model.safetensors.index.json").write_text(_index({k: shard for k in sd}))
        if not keep_safetensors:
            (model / "model.safetensors").unlink()

    return f


def _weights_edit(fn: Callable[[dict], dict]) -> Callable[[Path], None]:
    def f(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        sd = fn(load_file(model / "model.safetensors"))
        save_file(sd, model / "model.safetensors", metadata={"format": "pt"})

    return f


def _nan(sd: dict, value: float) -> dict:
    k = "encoder.layer.1.attention.self.query.weight"
    sd[k] = sd[k].clone()
    sd[k][0, 0] = value
    return sd


_OK = _cfg("stages: [export]\n")
_NAMES = {}


def C(name: str, **kw: Any) -> Any:
    _NAMES[name] = True
    return pytest.param(Case(**kw), id=name)


CASES = [
    # ---- config structure and stage order (validate == run)
    C("empty-file", files={"c.yaml": ""}, fragments=("no stages",), model=None, both=True),
    C("empty-stages", files={"c.yaml": _cfg("stages: []\n")}, fragments=("stages", "no stages"), both=True),
    C("empty-mapping", files={"c.yaml": "{}\n"}, fragments=("no stages",), model=None),
    C(
        "quantize-before-export",
        files={"c.yaml": _cfg("stages: [quantize, export]\n")},
        fragments=("stages[0].quantize", "before 'quantize'"),
        both=True,
    ),
    C(
        "prune-after-export",
        files={"c.yaml": _cfg("stages: [export, prune]\n")},
        fragments=("stages[1].prune", "before 'export'"),
        both=True,
    ),
    C(
        "recover-after-export",
        files={"c.yaml": _cfg("stages: [export, recover, validate]\n")},
        fragments=("stages[1].recover",),
    ),
    C(
        "attention-after-export",
        files={"c.yaml": _cfg("stages: [export, attention]\n")},
        fragments=("stages[1].attention",),
    ),
    C(
        "validate-without-export",
        files={"c.yaml": _cfg("stages: [validate]\n")},
        fragments=("stages[0].validate", "export"),
        both=True,
    ),
    C("benchmark-without-export", files={"c.yaml": _cfg("stages: [benchmark]\n")}, fragments=("stages[0].benchmark",)),
    C(
        "precision-target-cannot-run",
        files={"c.yaml": _cfg("stages: [export, {quantize: {precision: fp16}}]\n", "[host-cpu, raspberry-pi-5]")},
        fragments=("stages[1].quantize", "'fp16'", "raspberry-pi-5"),
        both=True,
    ),
    C(
        "per-target-unknown",
        files={"c.yaml": _cfg("stages: [export, {quantize: {per_target: {jetson-orin-nano: fp16}}}]\n")},
        fragments=("per_target", "jetson-orin-nano"),
        both=True,
    ),
    C(
        "per-target-precision-unsupported",
        files={
            "c.yaml": _cfg(
                "stages: [export, {quantize: {per_target: {android-arm64: fp16}}}]\n", "[host-cpu, android-arm64]"
            )
        },
        fragments=("'fp16'", "android-arm64"),
    ),
    C(
        "export-opset-newer-than-target",
        files={
            "old.yaml": _profile(name="old-rt", opset=16),
            "c.yaml": _cfg("stages: [{export: {opset: 18}}]\n", "[old.yaml]"),
        },
        fragments=("opset 18", "old-rt"),
        both=True,
    ),
    C(
        "prune-strict-no-speedup",
        files={"c.yaml": _cfg("stages: [{prune: {pattern: unstructured, strict: true}}, export]\n")},
        fragments=("stages[0].prune", "no speedup"),
    ),
    C(
        "block-sparse-causal-window-on-encoder",
        files={"c.yaml": _cfg("stages: [{attention: {kernel: block_sparse, pattern: causal_window}}, export]\n")},
        fragments=("stages[0].attention", "causal_window"),
    ),
    C("unknown-stage", files={"c.yaml": _cfg("stages: [frobnicate]\n")}, fragments=("unknown stage 'frobnicate'",)),
    C(
        "unknown-stage-huge-name",
        files={"c.yaml": _cfg("stages: [" + "x" * 200000 + "]\n")},
        fragments=("unknown stage",),
    ),
    C(
        "stage-list-in-list",
        files={"c.yaml": _cfg("stages: [[export]]\n")},
        fragments=("stages[0]", "expected one mapping"),
    ),
    C(
        "stage-two-keys",
        files={"c.yaml": _cfg("stages: [{export: {}, quantize: {}}]\n")},
        fragments=("expected one mapping",),
    ),
    C(
        "stage-options-scalar",
        files={"c.yaml": _cfg("stages: [{export: 3}]\n")},
        fragments=("stages[0].export", "mapping"),
    ),
    C("stages-not-a-list", files={"c.yaml": _cfg("stages: export\n")}, fragments=("stages", "list")),
    C("config-is-a-list", files={"c.yaml": "- export\n"}, fragments=("must be a mapping",), model=None),
    C("config-is-a-scalar", files={"c.yaml": "hello\n"}, fragments=("must be a mapping",), model=None),
    C(
        "unknown-top-level-key",
        files={"c.yaml": _cfg("stages: [export]\nstagse: []\n")},
        fragments=("unknown key 'stagse'",),
    ),
    C(
        "unknown-stage-key",
        files={"c.yaml": _cfg("stages: [{export: {opsett: 18}}]\n")},
        fragments=("stages[0].export.opsett",),
        both=True,
    ),
    C(
        "bad-precision-value",
        files={"c.yaml": _cfg("stages: [export, {quantize: {precision: int3}}]\n")},
        fragments=("stages[1].quantize.precision",),
    ),
    C(
        "seed-2-pow-70",
        files={"c.yaml": _cfg("seed: 1180591620717411303424\nstages: [export]\n")},
        fragments=("seed",),
        both=True,
    ),
    C("seed-negative", files={"c.yaml": _cfg("seed: -1\nstages: [export]\n")}, fragments=("seed",)),
    C("seed-text", files={"c.yaml": _cfg("seed: abc\nstages: [export]\n")}, fragments=("seed",)),
    C(
        "nan-option",
        files={"c.yaml": _cfg("stages: [{prune: {sparsity: .nan}}, export]\n")},
        fragments=("stages[0].prune.sparsity",),
    ),
    C(
        "inf-option",
        files={"c.yaml": _cfg("stages: [export, {validate: {max_ppl_ratio: .inf}}]\n")},
        fragments=("stages[1].validate.max_ppl_ratio",),
    ),
    C(
        "negative-inf-gate",
        files={"c.yaml": _cfg("stages: [export, {validate: {min_cos_mean: -.inf}}]\n")},
        fragments=("min_cos_mean",),
    ),
    C(
        "max-length-zero",
        files={"c.yaml": "model: {path: model}\ntargets: [host-cpu]\ncalibration: {max_length: 0}\nstages: [export]\n"},
        fragments=("calibration.max_length",),
    ),
    C(
        "batch-size-zero",
        files={"c.yaml": "model: {path: model}\ntargets: [host-cpu]\ncalibration: {batch_size: 0}\nstages: [export]\n"},
        fragments=("calibration.batch_size",),
    ),
    C(
        "task-unknown",
        files={"c.yaml": "model: {path: model, task: translation}\ntargets: [host-cpu]\nstages: [export]\n"},
        fragments=("model.task",),
    ),
    C(
        "task-wrong-family",
        files={
            "c.yaml": "model: {path: model, task: text-generation}\ntargets: [host-cpu]\n"
            + SMALL
            + "stages: [export]\n"
        },
        fragments=("text-generation",),
        both=True,
    ),
    # ---- YAML itself
    C("billion-laughs", files={"c.yaml": _BOMB}, fragments=("anchors and aliases",), model=None, both=True),
    C("alias", files={"c.yaml": "x: &s [export]\nstages: *s\n"}, fragments=("anchors and aliases",), model=None),
    C(
        "anchor-only",
        files={"c.yaml": "stages: &s [export]\n"},
        fragments=("anchors and aliases", "line 1"),
        model=None,
    ),
    C(
        "merge-key",
        files={"c.yaml": "base: &b {sparsity: 0.5}\nstages: [{prune: {<<: *b}}]\n"},
        fragments=("anchors and aliases",),
        model=None,
    ),
    C(
        "deep-brackets",
        files={"c.yaml": "stages: " + "[" * 5000},
        fragments=("nested deeper than",),
        model=None,
        both=True,
    ),
    C("deep-braces", files={"c.yaml": "stages: " + "{a: " * 5000}, fragments=("nested deeper than",), model=None),
    C(
        "duplicate-stage-option",
        files={"c.yaml": _cfg("stages: [{prune: {sparsity: 0.5, sparsity: 0.9}}, export]\n")},
        fragments=("duplicate key 'sparsity'", "line 4"),
        both=True,
    ),
    C(
        "duplicate-top-level-key",
        files={"c.yaml": _cfg("stages: [export]\nstages: [quantize]\n")},
        fragments=("duplicate key 'stages'",),
    ),
    C(
        "python-tag",
        files={"c.yaml": "stages: !!python/object/apply:os.system ['touch EXECUTED']\n"},
        fragments=("python/object",),
        model=None,
    ),
    C("malformed-yaml", files={"c.yaml": "stages: [export\n  targets: {\n"}, fragments=("malformed YAML",), model=None),
    C("yaml-not-utf8", files={"c.yaml": b"stages: [export] # caf\xe9\n"}, fragments=("not UTF-8",), model=None),
    C("yaml-is-directory", files={"c.yaml": None}, fragments=("is a directory",), model=None),
    C("yaml-missing", files={}, fragments=("file not found",), model=None, both=True),
    C(
        "yaml-huge",
        files={"c.yaml": "# " + "x" * (2 << 20) + "\nstages: [export]\n"},
        fragments=("larger than",),
        model=None,
    ),
    # ---- targets and profiles
    C("targets-empty", files={"c.yaml": _cfg("stages: [export]\n", "[]")}, fragments=("targets",)),
    C(
        "targets-twice",
        files={"c.yaml": _cfg("stages: [export]\n", "[host-cpu, host-cpu]")},
        fragments=("listed twice",),
    ),
    C(
        "target-unknown",
        files={"c.yaml": _cfg("stages: [export]\n", "[jetson-nano-9000]")},
        fragments=("targets[0]", "jetson-nano-9000"),
        both=True,
    ),
    C(
        "target-name-nul",
        files={"c.yaml": _cfg("stages: [export]\n", '["host\\0cpu"]')},
        fragments=("targets[0]", "NUL"),
        both=True,
    ),
    C(
        "target-name-newline",
        files={"c.yaml": _cfg("stages: [export]\n", '["host\\ncpu"]')},
        fragments=("targets[0]", "\\n"),
    ),
    C(
        "profile-named-stages",
        files={"p.yaml": _profile(name="stages"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("reserved",),
        both=True,
    ),
    C(
        "profile-named-plots",
        files={"p.yaml": _profile(name="plots"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("reserved",),
    ),
    C(
        "profile-name-control-char",
        files={"p.yaml": _profile(name="a\x07b"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("name",),
    ),
    C(
        "profile-name-nul",
        files={"p.yaml": _profile(name="a\x00b"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("name",),
        both=True,
    ),
    C(
        "profile-name-slash",
        files={"p.yaml": _profile(name="../evil"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("name",),
    ),
    C(
        "profile-name-dot",
        files={"p.yaml": _profile(name="a.b"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("name",),
    ),
    C(
        "profile-name-space",
        files={"p.yaml": _profile(name="my board"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("name",),
    ),
    C(
        "profile-name-dash-first",
        files={"p.yaml": _profile(name="-rf"), "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("name",),
    ),
    C(
        "profile-nan-tolerance",
        files={
            "p.yaml": _profile(
                name="b", tolerances={"fp32": {"atol": float("nan")}, "int8": {"atol": 1}, "fp16": {"atol": 1}}
            ),
            "c.yaml": _cfg("stages: [export]\n", "[p.yaml]"),
        },
        fragments=("atol",),
    ),
    C("profile-missing", files={"c.yaml": _cfg("stages: [export]\n", "[nope.yaml]")}, fragments=("not found",)),
    C(
        "profile-malformed",
        files={"p.yaml": "name: [\n", "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("malformed YAML",),
    ),
    C(
        "profile-alias-bomb",
        files={"p.yaml": _BOMB, "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("anchors and aliases",),
    ),
    C(
        "profile-duplicate-key",
        files={"p.yaml": "name: a\nname: b\n", "c.yaml": _cfg("stages: [export]\n", "[p.yaml]")},
        fragments=("duplicate key 'name'",),
    ),
    C(
        "two-profiles-one-name",
        files={
            "p.yaml": _profile(name="twin"),
            "q.yaml": _profile(name="twin"),
            "c.yaml": _cfg("stages: [export]\n", "[p.yaml, q.yaml]"),
        },
        fragments=("two targets are named 'twin'",),
        both=True,
    ),
    C(
        "profile-relative-to-yaml-folder",
        files={
            "sub/p.yaml": _profile(name="my-board"),
            "sub/c.yaml": "model: {path: ../model}\ntargets: [p.yaml]\n"
            + SMALL.replace("calib.txt", "../calib.txt")
            + "stages: [export]\n",
        },
        argv=("validate", "sub/c.yaml"),
        ok=True,
    ),
    # ---- calibration text
    C(
        "calibration-missing",
        files={"c.yaml": _cfg("stages: [export]\n").replace("calib.txt", "nope.txt")},
        fragments=("calibration.file", "not found"),
        both=True,
    ),
    C(
        "calibration-empty",
        files={"calib.txt": "", "c.yaml": _cfg("stages: [export]\n")},
        fragments=("calibration.file", "no non-blank"),
        both=True,
    ),
    C(
        "calibration-blank-lines",
        files={"calib.txt": "\n \n\t\n", "c.yaml": _cfg("stages: [export]\n")},
        fragments=("calibration.file", "no non-blank"),
    ),
    C(
        "calibration-binary",
        files={"calib.txt": b"\x00\x01\x02PK\x03\x04" * 100, "c.yaml": _cfg("stages: [export]\n")},
        fragments=("calibration.file", "binary"),
        both=True,
    ),
    C(
        "calibration-latin1",
        files={"calib.txt": ("caf\xe9 au lait\n" * 40).encode("latin-1"), "c.yaml": _cfg("stages: [export]\n")},
        fragments=("calibration.file", "not UTF-8"),
        both=True,
    ),
    C(
        "calibration-directory",
        files={"calib.txt": None, "c.yaml": _cfg("stages: [export]\n")},
        fragments=("calibration.file", "directory"),
        both=True,
    ),
    C(
        "calibration-too-few",
        files={"calib.txt": "one\ntwo\n", "c.yaml": _cfg("stages: [export]\n")},
        fragments=("calibration", "2 passages"),
        both=True,
    ),
    C(
        "calibration-dev-null",
        files={"c.yaml": _cfg("stages: [export]\n").replace("calib.txt", "/dev/null")},
        fragments=("calibration.file", "not a regular file"),
    ),
    # ---- model folder, refused before any weights are read
    C(
        "model-path-missing",
        files={"c.yaml": _cfg("stages: [export]\n")},
        model=None,
        fragments=("model.path", "not a directory"),
        both=True,
    ),
    C(
        "model-path-is-file",
        files={"model": "x", "c.yaml": _cfg("stages: [export]\n")},
        model=None,
        fragments=("model.path", "not a directory"),
    ),
    C("no-config-json", files={"model/config.json": _DEL, "c.yaml": _OK}, fragments=("model.path", "no config.json")),
    C(
        "config-json-garbage",
        files={"model/config.json": "{not json", "c.yaml": _OK},
        fragments=("model.path", "config.json"),
    ),
    C(
        "config-json-list",
        files={"model/config.json": "[1, 2]", "c.yaml": _OK},
        fragments=("config.json", "JSON object"),
    ),
    C(
        "config-json-not-utf8",
        files={"model/config.json": b'{"model_type": "b\xe9rt"}', "c.yaml": _OK},
        fragments=("config.json", "UTF-8"),
    ),
    C(
        "config-json-deep",
        files={"model/config.json": "[" * 100000 + "]" * 100000, "c.yaml": _OK},
        fragments=("config.json",),
    ),
    C(
        "model-type-unsupported",
        files={"model/config.json": _json_edit(model_type="whisper"), "c.yaml": _OK},
        fragments=("unsupported model_type 'whisper'",),
        both=True,
    ),
    C(
        "model-type-missing",
        files={"model/config.json": _json_edit(model_type=_DEL), "c.yaml": _OK},
        fragments=("model_type",),
    ),
    C(
        "heads-as-text",
        files={"model/config.json": _json_edit(num_attention_heads="two"), "c.yaml": _OK},
        fragments=("num_attention_heads", "'two'"),
        both=True,
    ),
    C(
        "layers-negative",
        files={"model/config.json": _json_edit(num_hidden_layers=-1), "c.yaml": _OK},
        fragments=("num_hidden_layers",),
    ),
    C("vocab-bool", files={"model/config.json": _json_edit(vocab_size=True), "c.yaml": _OK}, fragments=("vocab_size",)),
    C(
        "hidden-size-float",
        files={"model/config.json": _json_edit(hidden_size=32.5), "c.yaml": _OK},
        fragments=("hidden_size",),
    ),
    C(
        "heads-do-not-divide-hidden",
        files={"model/config.json": _json_edit(hidden_size=30), "c.yaml": _OK},
        fragments=("not divisible",),
    ),
    C(
        "architectures-not-list",
        files={"model/config.json": _json_edit(architectures="BertModel"), "c.yaml": _OK},
        fragments=("architectures",),
    ),
    C(
        "auto-map-in-config",
        files={
            "model/config.json": _json_edit(auto_map={"AutoModel": "evil.EvilModel"}),
            "model/evil.py": _PLANT,
            "c.yaml": _OK,
        },
        fragments=("auto_map", "never runs code"),
        both=True,
    ),
    C(
        "auto-map-in-tokenizer-config",
        files={
            "model/tokenizer_config.json": _json_edit(auto_map={"AutoTokenizer": ["evil.Tok", None]}),
            "model/evil.py": _PLANT,
            "c.yaml": _OK,
        },
        fragments=("tokenizer_config.json", "auto_map"),
        both=True,
    ),
    C(
        "auto-map-in-other-json",
        files={
            "model/preprocessor_config.json": json.dumps({"auto_map": {"AutoProcessor": "evil.P"}}),
            "model/evil.py": _PLANT,
            "c.yaml": _OK,
        },
        fragments=("preprocessor_config.json", "auto_map"),
    ),
    C(
        "pickle-only",
        files={"model/model.safetensors": _DEL, "model/pytorch_model.bin": b"\x80\x04K\x01.", "c.yaml": _OK},
        fragments=("pickle weights are not loaded",),
        both=True,
    ),
    C(
        "index-with-bin-shards",
        files={"model": _shard_setup("pytorch_model-00001-of-00001.bin"), "c.yaml": _OK},
        fragments=("pickle weights are not loaded",),
        both=True,
    ),
    C(
        "index-bin-beside-safetensors",
        files={"model": _shard_setup("pytorch_model.bin", keep_safetensors=True), "c.yaml": _OK},
        fragments=("pickle weights are not loaded",),
    ),
    C(
        "index-shard-outside-folder",
        files={"model": _shard_setup("../model.safetensors"), "c.yaml": _OK},
        fragments=("outside the model folder",),
    ),
    C(
        "index-shard-absolute",
        files={"model": _shard_setup("/etc/model.safetensors"), "c.yaml": _OK},
        fragments=("outside the model folder",),
    ),
    C(
        "index-shard-missing",
        files={"model": _shard_setup("model-00001-of-00002.safetensors"), "c.yaml": _OK},
        fragments=("is missing",),
    ),
    C(
        "index-malformed",
        files={"model/model.safetensors.index.json": '{"weight_map": 7}', "c.yaml": _OK},
        fragments=("weight_map",),
    ),
    C("no-weights", files={"model/model.safetensors": _DEL, "c.yaml": _OK}, fragments=("no weights found",)),
    C(
        "no-tokenizer",
        files={"c.yaml": _OK},
        model="bert-notok",
        fragments=("no tokenizer files", "model.tokenizer: false"),
        both=True,
    ),
    C(
        "no-tokenizer-declared",
        files={"c.yaml": _OK.replace("{path: model}", "{path: model, tokenizer: false}")},
        model="bert-notok",
        ok=True,
    ),
    C(
        "tokenizer-false-but-present",
        files={"c.yaml": _OK.replace("{path: model}", "{path: model, tokenizer: false}")},
        fragments=("model.tokenizer",),
    ),
    C("valid-config", files={"c.yaml": _OK}, ok=True),
    # ---- the run folder (refused before anything is written)
    C(
        "workdir-empty-string",
        files={"c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", ""),
        fragments=("--workdir", "empty"),
    ),
    C(
        "workdir-is-model-folder",
        files={"c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "model"),
        fragments=("--workdir", "model folder"),
    ),
    C(
        "workdir-inside-model-folder",
        files={"c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "model/runs"),
        fragments=("--workdir", "model folder"),
    ),
    C(
        "workdir-holds-model-folder",
        files={"c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "."),
        fragments=("--workdir", "model folder"),
    ),
    C(
        "workdir-is-file",
        files={"w": "my notes", "c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "w"),
        fragments=("--workdir", "is a file"),
    ),
    C(
        "workdir-below-file",
        files={"w": "my notes", "c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "w/run"),
        fragments=("--workdir", "is a file"),
    ),
    C(
        "workdir-foreign-folder",
        files={
            "w/report.md": "my thesis",
            "w/host-cpu/notes.txt": "n",
            "w/stages/01-export/keep.txt": "k",
            "w/.thesis.tmp": "t",
            "c.yaml": _OK,
        },
        argv=("run", "c.yaml", "--workdir", "w"),
        fragments=("not an edgepipe run folder",),
    ),
    C(
        "workdir-only-hidden-file",
        files={"w/.thesis.tmp": "t", "c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "w"),
        fragments=("not an edgepipe run folder",),
    ),
    C(
        "workdir-marker-is-link",
        files={"w/.edgepipe-run": ("link", "../c.yaml"), "c.yaml": _OK},
        argv=("run", "c.yaml", "--workdir", "w"),
        fragments=(".edgepipe-run",),
    ),
    C(
        "workdir-lock-is-link",
        files={
            "w/.edgepipe-run": "{}",
            "w/.edgepipe.lock": ("link", "../victim.txt"),
            "victim.txt": "precious",
            "c.yaml": _OK,
        },
        argv=("run", "c.yaml", "--workdir", "w"),
        fragments=(".edgepipe.lock", "symbolic link"),
    ),
    C(
        "workdir-stages-is-link",
        files={
            "w/.edgepipe-run": "{}",
            "w/stages": ("link", "../victim"),
            "victim/keep.txt": "precious",
            "c.yaml": _OK,
        },
        argv=("run", "c.yaml", "--workdir", "w"),
        fragments=("'stages' is a symbolic link",),
    ),
    C(
        "validate-checks-workdir",
        files={"w/report.md": "mine", "c.yaml": _OK},
        argv=("validate", "c.yaml", "--workdir", "w"),
        fragments=("not an edgepipe run folder",),
    ),
    # ---- other commands
    C("targets-show-no-name", argv=("targets", "show"), fragments=("targets show",), model=None),
    C(
        "targets-show-unknown",
        argv=("targets", "show", "nope-9000"),
        fragments=("unknown target 'nope-9000'",),
        model=None,
    ),
    C(
        "targets-show-malformed-file",
        files={"p.yaml": "name: [\n"},
        argv=("targets", "show", "p.yaml"),
        fragments=("malformed YAML",),
        model=None,
    ),
    C("targets-file-missing", argv=("targets", "--file", "nope.yaml"), fragments=("not found",), model=None),
    C("targets-show-nul", argv=("targets", "show", "a\x00b"), fragments=("NUL",), model=None),
    C(
        "plan-seq-zero",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "0", "--head-dim", "64"),
        fragments=("--seq",),
        model=None,
    ),
    C(
        "plan-seq-negative",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "-5", "--head-dim", "64"),
        fragments=("--seq",),
        model=None,
    ),
    C(
        "plan-head-dim-zero",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "128", "--head-dim", "0"),
        fragments=("--head-dim",),
        model=None,
    ),
    C(
        "plan-density-above-one",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "128", "--head-dim", "64", "--density", "1.5"),
        fragments=("--density",),
        model=None,
    ),
    C(
        "plan-density-nan",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "128", "--head-dim", "64", "--density", "nan"),
        fragments=("--density",),
        model=None,
    ),
    C(
        "plan-density-zero",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "128", "--head-dim", "64", "--density", "0"),
        fragments=("--density",),
        model=None,
    ),
    C(
        "plan-huge-causal",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "100000000", "--causal", "--head-dim", "64"),
        fragments=("--seq",),
        model=None,
    ),
    C(
        "plan-long-causal",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "100000", "--causal", "--head-dim", "64"),
        fragments=("--causal",),
        model=None,
    ),
    C(
        "plan-unknown-target",
        argv=("plan-attention", "--target", "nope", "--seq", "128", "--head-dim", "64"),
        fragments=("unknown target",),
        model=None,
    ),
    C(
        "plan-seq-not-int",
        argv=("plan-attention", "--target", "host-cpu", "--seq", "many", "--head-dim", "64"),
        fragments=("--seq",),
        model=None,
    ),
    C("unknown-command", argv=("frobnicate",), fragments=("frobnicate",), model=None),
    C("run-config-missing", argv=("run", "nope.yaml", "--workdir", "w"), fragments=("file not found",), model=None),
]


def _lay_out(root: Path, case: Case, base_models: dict[str, Path]) -> None:
    if case.model:
        shutil.copytree(base_models[case.model], root / "model")
    (root / "calib.txt").write_text(CALIB)
    for rel, content in case.files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            p.unlink(missing_ok=True)
            p.mkdir()
        elif content is _DEL:
            p.unlink()
        elif isinstance(content, tuple) and content[0] == "link":
            p.symlink_to(content[1])
        elif callable(content):
            content(p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


@pytest.mark.parametrize("case", CASES)
def test_hostile_input(case: Case, tmp_path, base_models, capsys, guard):
    root = tmp_path / "case"
    root.mkdir()
    _lay_out(root, case, base_models)
    before = snapshot(root)
    commands = [list(case.argv)]
    if case.both:
        commands.append(["run", *case.argv[1:], "--workdir", "w"])
    lines = []
    for argv in commands:
        t0 = time.perf_counter()
        code, _out, err = run_cli(capsys, argv, cwd=root)
        assert time.perf_counter() - t0 < 30, "a bad input must be refused quickly"
        if case.ok:
            assert code == 0 and "Traceback" not in err, err
        else:
            line = assert_refused(code, err, case.fragments)
            lines.append(line.split(": error: ", 1)[1])
    assert len(set(lines)) <= 1, f"validate and run disagree: {lines}"
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before, "a file edgepipe did not create was changed"
    new = set(after) - set(before)
    # new entries only inside a folder that was already edgepipe's (e.g. its lock file)
    assert not new or ("w/.edgepipe-run" in before and all(k.startswith("w/") for k in new)), sorted(new)
    assert not list(root.rglob("EXECUTED")), "code from a model folder or a config ran"


def test_battery_size():
    assert len(CASES) >= 100


# ----------------------------------------------------------------------------- cases that need the weights


@pytest.mark.parametrize(
    "name, edit, fragments",
    [
        (
            "missing-layer-1",
            _weights_edit(lambda sd: {k: v for k, v in sd.items() if "layer.1." not in k}),
            ("lack tensor", "encoder.layer.1."),
        ),
        ("config-4-layers-weights-2", "layers4", ("lack tensor", "encoder.layer.2.")),
        ("config-1-layer-weights-2", "layers1", ("config has no place for", "encoder.layer.1.")),
        ("shape-mismatch", "inter48", ("intermediate.dense", "shape")),
        (
            "nan-weight",
            _weights_edit(lambda sd: _nan(sd, float("nan"))),
            ("encoder.layer.1.attention.self.query.weight", "NaN or inf"),
        ),
        (
            "inf-weight",
            _weights_edit(lambda sd: _nan(sd, float("inf"))),
            ("encoder.layer.1.attention.self.query.weight", "NaN or inf"),
        ),
        ("garbage-safetensors", "garbage", ("failed to load",)),
        ("truncated-safetensors", "truncated", ("failed to load",)),
    ],
)
def test_bad_weights_refused_at_load(name, edit, fragments, tmp_path, base_models, capsys, guard):
    root = tmp_path / "case"
    root.mkdir()
    model = root / "model"
    shutil.copytree(base_models["bert"], model)
    (root / "calib.txt").write_text(CALIB)
    if callable(edit):
        edit(model)
    elif edit.startswith("layers"):
        _json_edit(num_hidden_layers=int(edit[-1]))(model / "config.json")
    elif edit == "inter48":
        _json_edit(intermediate_size=48)(model / "config.json")
    elif edit == "garbage":
        (model / "model.safetensors").write_bytes(b"\x00" * 64)
    elif edit == "truncated":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "c.yaml").write_text(_OK)
    before = snapshot(root)
    code, _, err = run_cli(capsys, ["run", "c.yaml", "--workdir", "w", "--quiet"], cwd=root)
    assert_refused(code, err, ("stage 'export'", *fragments))
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("w")} == before
    assert not (root / "w" / "report.json").exists()


# ------------------------------------------------------------------------------------ the Python API


def test_python_api_takes_yaml_stage_forms_or_raises_config_error(base_models, tmp_path):
    from pipeline.config import coerce_config
    from pipeline.errors import ConfigError

    cfg = {"model": {"path": str(base_models["bert"])}, "targets": ["host-cpu"]}
    assert [s.kind for s in coerce_config(cfg, stages=["export", {"validate": {}}]).stages] == ["export", "validate"]
    assert [s.kind for s in coerce_config(cfg, stages=[{"export": None}]).stages] == ["export"]
    for bad in ("export", [42], [{"nope": {}}], {"export": {}}, [{"export": {"opsett": 1}}]):
        with pytest.raises(ConfigError):
            coerce_config(cfg, stages=bad)
    import pipeline

    for kwargs in ({"workdir": ""}, {"workdir": "a\0b"}, {"workdir": str(base_models["bert"])}):
        with pytest.raises(ConfigError):
            pipeline.run({**cfg, "stages": ["export"]}, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="no stages"):
        pipeline.run({**cfg, "stages": []}, workdir=tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


def test_stage_failure_message_is_its_first_line_only(tmp_path, base_models, capsys, monkeypatch):
    """A third-party exception with a long message (an exporter's graph dump) becomes one line."""
    from pipeline.stage import STAGES, StageSpec

    def boom(art, cfg, ctx):
        raise RuntimeError("export failed: unsupported op\n" + "\n".join(f"graph line {i}" for i in range(820)))

    import pipeline.stages  # noqa: F401

    spec = STAGES["export"]
    monkeypatch.setitem(STAGES, "export", StageSpec(spec.kind, spec.config_cls, boom, spec.version, spec.description))
    shutil.copytree(base_models["bert"], tmp_path / "model")
    (tmp_path / "calib.txt").write_text(CALIB)
    (tmp_path / "c.yaml").write_text(_OK)
    code, _, err = run_cli(capsys, ["run", "c.yaml", "--workdir", "w", "--quiet"], cwd=tmp_path)
    line = assert_refused(code, err, ("stage 'export'", "unsupported op"))
    assert "graph line" not in line


def test_gates_fail_on_nan():
    from pipeline.stages.validate import _below

    assert _below(float("nan"), 0.9) and _below(0.5, 0.9) and not _below(0.95, 0.9)


# ------------------------------------------------------------ a real run: the run folder's guarantees


@pytest.fixture(scope="module")
def real_run(base_models, tmp_path_factory):
    import pipeline

    root = tmp_path_factory.mktemp("owned")
    (root / "calib.txt").write_text(CALIB)
    cfg = {
        "model": {"path": str(base_models["bert"])},
        "targets": ["host-cpu"],
        "calibration": {"file": str(root / "calib.txt"), "samples": 4, "heldout": 8, "max_length": 16},
    }
    model_before = snapshot(base_models["bert"])
    report = pipeline.run(cfg, stages=["export"], workdir=root / "w", progress=False)  # the YAML form via the API
    assert snapshot(base_models["bert"]) == model_before
    return cfg, root / "w", report


def test_run_folder_marked_and_modes_uniform(real_run):
    _, w, report = real_run
    assert report["ok"] and (w / ".edgepipe-run").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    for rel in ("report.json", "report.md", "manifest.json", "host-cpu/model.onnx", ".edgepipe-run"):
        assert stat.S_IMODE((w / rel).stat().st_mode) == want, rel
    assert stat.S_IMODE((w / "host-cpu").stat().st_mode) == 0o777 & ~umask


def test_published_files_are_independent_of_the_stage_cache(real_run):
    """Editing a published model in place must not corrupt the cache the next run republishes from."""
    import pipeline

    cfg, w, _ = real_run
    pub = w / "host-cpu" / "model.onnx"
    cache = w / "stages" / "01-export" / "opset18" / "model.onnx"
    original = cache.read_bytes()
    assert pub.stat().st_ino != cache.stat().st_ino
    with open(pub, "ab") as fh:  # the user post-processes the published file in place
        fh.write(b"user edit")
    assert cache.read_bytes() == original
    report = pipeline.run(cfg, stages=[{"export": {}}], workdir=w, progress=False)
    assert report["stages"][0]["status"] == "cached"
    assert pub.read_bytes() == original
    man = json.loads((w / "manifest.json").read_text())
    assert man["outputs_sha256"]["host-cpu/model.onnx"] == hashlib.sha256(original).hexdigest()


def test_planted_links_in_run_folder_are_not_followed(real_run, tmp_path, capsys):
    """Links planted at edgepipe's names in its own folder are replaced or refused, never written through."""
    import pipeline

    cfg, w, _ = real_run
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (w / "plots").mkdir(exist_ok=True)
    for name in ("report.md", "manifest.json"):
        (w / name).unlink()
        (w / name).symlink_to(victim)
    pipeline.run(cfg, stages=["export"], workdir=w, progress=False)
    assert victim.read_bytes() == b"precious"
    assert not (w / "report.md").is_symlink() and not (w / "manifest.json").is_symlink()
    # debris with an edgepipe temp-file name (a killed run) is cleaned from edgepipe's own folder
    (w / ".report.json.abcd1234.tmp").write_text("debris")
    pipeline.run(cfg, stages=["export"], workdir=w, progress=False)
    assert not (w / ".report.json.abcd1234.tmp").exists()


def test_subprocess_cli_one_line_no_traceback(tmp_path):
    """The real entry point (a fresh interpreter): one line, exit 2, for a handful of cases."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "bomb.yaml").write_text(_BOMB)
    (tmp_path / "deep.yaml").write_text("stages: " + "[" * 5000)
    for argv in (["validate", "bomb.yaml"], ["validate", "deep.yaml"], ["targets", "show"]):
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *argv],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )
        assert time.perf_counter() - t0 < 60
        assert_refused(res.returncode, res.stderr, ())


def test_tool_loggers_silent_without_debug(tmp_path):
    """onnxruntime's ORT-format converter sets its logger to DEBUG and calls logging.basicConfig(); without
    --debug its INFO lines ("Created config in ...") must not reach the user, even under --quiet."""
    code = (
        "import logging, sys; from pipeline.cli import _setup_logging; _setup_logging({quiet}, False)\n"
        "from onnxruntime.tools.ort_format_model import utils\n"
        "utils.log.info('Created config in /somewhere'); logging.getLogger('check_usability').warning('chatter')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for quiet in (True, False):
        res = subprocess.run(
            [sys.executable, "-c", code.format(quiet=quiet)], capture_output=True, text=True, env=env, timeout=120
        )
        assert res.returncode == 0, res.stderr
        assert res.stderr == "", res.stderr
