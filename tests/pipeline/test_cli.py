"""The command line: one clear line and exit code 2 for bad input, no traceback unless --debug."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def edgepipe(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def _one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("edgepipe: error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_misspelled_key_exit_2_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: [host-cpu]\nstages:\n  - export: {}\n  - validate: {min_cos_maen: 0.9}\n")
    for cmd in ("validate", "run"):
        line = _one_line_error(
            edgepipe(cmd, str(cfg), "--workdir", str(tmp_path / "w")) if cmd == "run" else edgepipe(cmd, str(cfg))
        )
        assert "min_cos_maen" in line and str(cfg) in line
    assert not (tmp_path / "w").exists()  # rejected before anything ran


def test_debug_shows_the_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stages: [{export: {opsett: 18}}]\n")
    res = edgepipe("validate", str(cfg), "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


@pytest.mark.parametrize(
    "model_setup, fragment",
    [
        ("missing", "is not a directory"),
        ("no_config", "has no config.json"),
        ("corrupt_config", "cannot read config.json"),
        ("pickle_only", "refusing to load"),
        ("unsupported", "unsupported model_type"),
    ],
)
def test_bad_model_dir(tmp_path, model_setup, fragment):
    m = tmp_path / "model"
    if model_setup != "missing":
        m.mkdir()
    if model_setup == "corrupt_config":
        (m / "config.json").write_text("{not json")
    if model_setup == "pickle_only":
        (m / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        (m / "pytorch_model.bin").write_bytes(b"\x80\x04")
    if model_setup == "unsupported":
        (m / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {m}}}\ntargets: [host-cpu]\nstages: [export]\n")
    line = _one_line_error(edgepipe("run", str(cfg), "--workdir", str(tmp_path / "w")))
    assert fragment in line and "model.path" in line


def test_unknown_target(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: [host-cpu, jetson-nano-9000]\nstages: [export]\n")
    assert "jetson-nano-9000" in _one_line_error(edgepipe("run", str(cfg)))


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stages: [export\n  targets: {\n")
    assert "malformed YAML" in _one_line_error(edgepipe("validate", str(cfg)))


def test_targets_list_and_show(tmp_path):
    res = edgepipe("targets")
    assert res.returncode == 0
    for name in (
        "host-cpu",
        "raspberry-pi-4",
        "raspberry-pi-5",
        "jetson-orin-nano",
        "jetson-agx-orin",
        "android-arm64",
        "ios-arm64",
    ):
        assert name in res.stdout
    show = edgepipe("targets", "show", "android-arm64")
    assert show.returncode == 0 and "ort_format: true" in show.stdout
    user = tmp_path / "board.yaml"
    user.write_text(show.stdout.replace("name: android-arm64", "name: my-board"))
    res = edgepipe("targets", "--file", str(user))
    assert res.returncode == 0 and "my-board" in res.stdout and str(user) in res.stdout


def test_unsupported_precision_for_target(tmp_path, tiny_models):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models['bert']}}}\ntargets: [raspberry-pi-5]\ncalibration: {{samples: 4, heldout: 8, max_length: 16}}\nstages: [export, {{quantize: {{precision: fp16}}}}]\n"
    )
    line = _one_line_error(edgepipe("run", str(cfg), "--workdir", str(tmp_path / "w")))
    assert "precision 'fp16' is not supported by target 'raspberry-pi-5'" in line


def test_op_newer_than_target_opset(tmp_path, tiny_models):
    import yaml

    from targets import load_target

    data = load_target("host-cpu").model_dump(mode="json")
    data.update(name="old-runtime", opset=16)
    prof = tmp_path / "old.yaml"
    prof.write_text(yaml.safe_dump(data))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models['bert']}}}\ntargets: [{prof}]\ncalibration: {{samples: 4, heldout: 8, max_length: 16}}\nstages: [{{export: {{opset: 18}}}}]\n"
    )
    line = _one_line_error(edgepipe("run", str(cfg), "--workdir", str(tmp_path / "w")))
    assert "opset 18" in line and "old-runtime" in line


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_tiny_models_run_end_to_end(tmp_path, tiny_models, family):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{path: {tiny_models[family]}}}\ntargets: [host-cpu, raspberry-pi-5]\n"
        "calibration: {samples: 8, heldout: 8, max_length: 24}\n"
        "stages: [export, quantize, validate, {benchmark: {runs: 3, warmup: 1, seq: 24}}]\n"
    )
    # bert without --quiet: stderr is a pipe here (as in CI), so no progress bar may be drawn into it
    res = edgepipe("run", str(cfg), "--workdir", str(tmp_path / "w"), *(["--quiet"] if family != "bert" else []))
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "it/s]" not in res.stderr and "s/it]" not in res.stderr, res.stderr[-500:]
    rep = json.loads((tmp_path / "w" / "report.json").read_text())
    host = rep["targets"]["host-cpu"]
    assert host["parity"]["ok"] and rep["targets"]["raspberry-pi-5"]["parity"]["ok"]
    if family != "bert":
        export = rep["stages"][0]["metrics"]["exports"]
        assert all(e["with_past"] for e in export.values())  # decoders ship a KV cache
        assert host["generation"]["identical"] is True
        import onnx

        names = [
            i.name for i in onnx.load(str(tmp_path / "w" / host["artifact"]), load_external_data=False).graph.input
        ]
        assert "past_key_values.0.key" in names


def test_plan_attention_reads_the_target_cache():
    big = json.loads(
        edgepipe("plan-attention", "--target", "raspberry-pi-5", "--seq", "4096", "--head-dim", "64", "--json").stdout
    )
    assert big["cache_words"] == 512 * 1024 // 4 and big["algorithm"] == "flash"
    assert big["predicted_io_words"] >= big["lower_bound_words"] > 0 and big["peak_working_words"] <= big["cache_words"]
    # Pi 4 plans against its 32 KiB L1 (8192 words), far below d^2 for d = 256: the small-cache algorithm
    small = json.loads(
        edgepipe("plan-attention", "--target", "raspberry-pi-4", "--seq", "4096", "--head-dim", "256", "--json").stdout
    )
    assert small["cache_words"] == 8192 and small["algorithm"] == "small_cache"
    text = edgepipe("plan-attention", "--target", "raspberry-pi-5", "--seq", "1024", "--head-dim", "64")
    assert text.returncode == 0 and "lower bound" in text.stdout


def test_validate_reads_a_tune_file(tmp_path, tiny_models):
    base = (
        f"model: {{path: {tiny_models['bert']}}}\ntargets: [host-cpu]\ncalibration: {{samples: 8, heldout: 8}}\n"
        "stages: [{prune: {pattern: structured}}, export, quantize, validate, benchmark]\n"
        "objective: {minimize: [latency_ms]}\n"
    )
    good = tmp_path / "tune.yaml"
    good.write_text(base + "space: {prune.structured_unit: [heads+ffn, layers], quantize.precision: [fp32, int8]}\n")
    res = edgepipe("validate", str(good))
    assert res.returncode == 0, res.stderr
    assert "OK (tune: 2 dimensions, 4 trial configurations checked" in res.stdout
    assert not (tmp_path / "ray").exists() and ".ray-tmp" not in os.listdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(base + "space: {prune.method: [sparsegpt], prune.structured_unit: [qk_dims+ffn]}\n")
    line = _one_line_error(edgepipe("validate", str(bad)))
    assert str(bad) in line and "trial [prune.method=sparsegpt, prune.structured_unit=qk_dims+ffn]" in line


def test_key_typos_say_did_you_mean(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("targets: [host-cpu]\ncalibraton: {samples: 8}\nstages: [export]\n")
    assert "unknown key 'calibraton' (did you mean 'calibration'?)" in _one_line_error(edgepipe("validate", str(cfg)))
    cfg.write_text("targets: [host-cpu]\nstages: [{exprt: {}}]\n")
    assert "unknown stage 'exprt' (did you mean 'export'?)" in _one_line_error(edgepipe("validate", str(cfg)))
    cfg.write_text("targets: [host-cpu]\nstages: [export, {validate: {min_cos_maen: 0.9}}]\n")
    assert "(did you mean 'min_cos_mean'?)" in _one_line_error(edgepipe("validate", str(cfg)))
    cfg.write_text("targets: [host-cpu]\nstages: [export, {validate: {zzzz: 0.9}}]\n")
    assert "did you mean" not in _one_line_error(edgepipe("validate", str(cfg)))  # nothing close: no guess
