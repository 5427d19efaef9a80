"""The runner: staged, cached, resumable runs; report and run-folder contract; gates fail after the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline
from pipeline.errors import ValidationFailed

pytestmark = pytest.mark.slow

STAGES = [{"export": {}}, {"quantize": {}}, {"validate": {}}, {"benchmark": {"runs": 3, "warmup": 1, "seq": 32}}]


DEFAULT_TARGETS = ("host-cpu", "raspberry-pi-5", "jetson-orin-nano", "android-arm64")


def _cfg(model: Path, targets=DEFAULT_TARGETS, stages=STAGES, **extra):
    return {
        "model": {"path": str(model)},
        "targets": list(targets),
        "calibration": {"samples": 8, "heldout": 16, "max_length": 32},
        "stages": stages,
        **extra,
    }


def _artifact_hashes(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "manifest.json").read_text())["outputs_sha256"]


@pytest.fixture(scope="module")
def first_run(tiny_models, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "r"
    t0 = time.perf_counter()
    report = pipeline.run(_cfg(tiny_models["bert"]), workdir=run_dir, progress=False)
    return run_dir, report, time.perf_counter() - t0


def test_report_contract(first_run):
    run_dir, report, _ = first_run
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["ok"] is True and report["ok"] is True
    assert [s["name"] for s in on_disk["stages"]] == ["export", "quantize", "validate", "benchmark"]
    assert all(s["status"] == "ran" and s["seconds"] >= 0 for s in on_disk["stages"])
    for name, prec in (
        ("host-cpu", "fp32"),
        ("raspberry-pi-5", "int8"),
        ("jetson-orin-nano", "fp16"),
        ("android-arm64", "int8"),
    ):
        t = on_disk["targets"][name]
        assert t["precision"] == prec
        assert (run_dir / t["artifact"]).is_file() and t["size_bytes"] == (run_dir / t["artifact"]).stat().st_size
        assert t["parity"]["ok"] is True and t["parity"]["max_abs_diff"] <= t["parity"]["atol"]
        assert {"cos_mean", "cos_min", "recall_at_10"} <= set(t["fidelity"])
        assert t["latency_ms"]["p50"] > 0 and t["latency_ms"]["p95"] >= t["latency_ms"]["p50"]
        assert t["peak_rss_mb"] > 0
        assert (run_dir / name / "bundle" / "evaluate.py").is_file()
    # mobile profile: ORT format + required operators config shipped
    files = on_disk["targets"]["android-arm64"]["files"]
    assert (run_dir / files["ort"]).is_file() and (run_dir / files["required_operators"]).is_file()
    assert on_disk["targets"]["host-cpu"]["fidelity"]["cos_mean"] > 0.9999  # fp32 export of the unmodified model
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["config"]["stages"][0] == {
        "export": {
            "exporter": "dynamo",
            "opset": None,
            "with_past": None,
            "cross_check": False,
            "external_data_mb": 1800.0,
        }
    }
    assert "torch" in man["versions"] and man["inputs"]["model_sha256"]
    assert (run_dir / "report.md").read_text().count("| host-cpu |") == 1


def test_raspberry_pi_bundle_runs_with_only_numpy_and_onnxruntime(first_run, device_python):
    run_dir, _, _ = first_run
    bundle = run_dir / "raspberry-pi-5" / "bundle"
    res = subprocess.run(
        [device_python, "evaluate.py", "--runs", "3"], cwd=bundle, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["ok"] is True and out["latency_ms"]["p50"] > 0 and out["peak_rss_mb"] > 0
    # the bundle really checks: a wrong reference makes it fail
    import numpy as np

    broken = run_dir / "broken-bundle"
    import shutil

    shutil.copytree(bundle, broken)
    ref = dict(np.load(broken / "reference.npz"))
    np.savez(broken / "reference.npz", **{k: v + 1.0 for k, v in ref.items()})
    res = subprocess.run(
        [device_python, "evaluate.py", "--runs", "1"], cwd=broken, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1 and json.loads(res.stdout.strip().splitlines()[-1])["ok"] is False
    shutil.rmtree(broken)


def test_unchanged_rerun_is_cached_and_identical(first_run):
    run_dir, _, first_seconds = first_run
    before = _artifact_hashes(run_dir)
    t0 = time.perf_counter()
    report = pipeline.run(
        _cfg(Path(json.loads((run_dir / "manifest.json").read_text())["inputs"]["model_path"])),
        workdir=run_dir,
        progress=False,
    )
    again = time.perf_counter() - t0
    assert [s["status"] for s in report["stages"]] == ["cached"] * 4
    assert _artifact_hashes(run_dir) == before
    assert again < first_seconds / 3


def test_changing_a_later_stage_reruns_only_from_there(first_run, tiny_models):
    run_dir, _, _ = first_run
    stages = STAGES[:3] + [{"benchmark": {"runs": 2, "warmup": 0, "seq": 32}}]
    report = pipeline.run(_cfg(tiny_models["bert"], stages=stages), workdir=run_dir, progress=False)
    assert [s["status"] for s in report["stages"]] == ["cached", "cached", "cached", "ran"]


def test_failed_gate_writes_report_then_fails(tiny_models, tmp_path):
    stages = [{"export": {}}, {"quantize": {"precision": "int8"}}, {"validate": {"min_cos_mean": 0.99999999}}]
    with pytest.raises(ValidationFailed) as e:
        pipeline.run(
            _cfg(tiny_models["bert"], targets=("host-cpu",), stages=stages), workdir=tmp_path / "r", progress=False
        )
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["ok"] is False and rep["failures"][0]["check"] == "cos_mean"
    assert "| host-cpu | cos_mean |" in e.value.table


_KILL_SCRIPT = """
import sys, pipeline
pipeline.run({cfg!r}, workdir={wd!r}, progress=False)
"""


def test_kill_9_mid_run_resumes_to_identical_artifacts(tiny_models, tmp_path, first_run):
    """Kill the run hard while a later stage is writing, rerun, and compare with an uninterrupted run."""
    ref_dir = tmp_path / "ref"
    cfg = _cfg(tiny_models["bert"])
    pipeline.run(cfg, workdir=ref_dir, progress=False)
    wd = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT.format(cfg=cfg, wd=str(wd))], env=env)
    # wait until export is complete and quantize has started writing, then SIGKILL
    deadline = time.time() + 240
    while time.time() < deadline:
        if (wd / "stages" / "01-export" / ".stage.json").exists() and any(
            p.name.startswith(".02-quantize.tmp-") for p in (wd / "stages").iterdir()
        ):
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    killed_mid_run = proc.poll() is None
    if killed_mid_run:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed"
    assert not (wd / "report.json").exists()
    report = pipeline.run(cfg, workdir=wd, progress=False)
    assert report["stages"][0]["status"] == "cached" and report["stages"][1]["status"] == "ran"
    assert not [p for p in (wd / "stages").iterdir() if ".tmp-" in p.name]
    ours, ref = _artifact_hashes(wd), _artifact_hashes(ref_dir)
    assert any(k.endswith(".onnx") for k in ref) and any(k.endswith(".ort") for k in ref)
    # every published file byte-identical, except .ort: ONNX Runtime's flatbuffer serializer orders some tables
    # differently from one conversion to the next (two conversions in one process differ), so for .ort we
    # check that it computes the same outputs
    assert {k: v for k, v in ours.items() if not k.endswith(".ort")} == {
        k: v for k, v in ref.items() if not k.endswith(".ort")
    }
    import numpy as np
    import onnxruntime as ort

    feeds = dict(np.load(wd / "android-arm64" / "bundle" / "inputs.npz"))
    outs = [
        ort.InferenceSession(str(d / "android-arm64" / "model.ort"), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )[0]
        for d in (wd, ref_dir)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
