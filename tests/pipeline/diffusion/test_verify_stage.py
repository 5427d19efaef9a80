"""End to end: a YAML run of prune -> export -> quantize -> validate -> verify_diffusion on a tiny score network;
a 90%-pruned network fails the gate with exit code 1 after the report is written."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main

VERIFY = {"steps": 50, "samples": 8000, "score_points": 4000, "lipschitz_points": 64}


def _yaml(tmp_path, model, name, sparsity, max_tv):
    cfg = {
        "model": {"path": str(model)},
        "targets": ["host-cpu", "raspberry-pi-5"],
        "calibration": {"samples": 4, "heldout": 8},
        "stages": [
            {"prune": {"method": "magnitude", "sparsity": sparsity}},
            {"export": {}},
            {"quantize": {"per_target": {"host-cpu": "fp32", "raspberry-pi-5": "int8"}}},
            {"validate": {"bundle": False}},
            {"verify_diffusion": {**VERIFY, "max_tv_measured": max_tv}},
        ],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _verify_metrics(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    (stage,) = [s for s in report["stages"] if s["name"] == "verify_diffusion"]
    return report, stage["metrics"]


@pytest.mark.slow
def test_yaml_run_reports_and_gates(example_score_model, tmp_path, capsys):
    good = _yaml(tmp_path, example_score_model, "good", 0.3, 0.2)
    assert main(["run", str(good), "--workdir", str(tmp_path / "good"), "--quiet"]) == 0
    report, m = _verify_metrics(tmp_path / "good")
    assert report["task"] == "score-model" and report["ok"]
    assert set(m) >= {"score_mse", "lipschitz", "tv_certificate", "tv_measured", "gate"}
    for key in ("score_mse", "tv_measured", "tv_certificate"):
        assert set(m[key]["per_target"]) == {"host-cpu", "raspberry-pi-5"} and m[key]["dense"] > 0
    assert m["lipschitz"]["bound"] > 0 and m["lipschitz"]["exact"] <= m["lipschitz"]["bound"] * (1 + 1e-9)
    assert m["gate"]["ok"] is True
    (export,) = [s for s in report["stages"] if s["name"] == "export"]
    assert all(e["max_abs_diff_vs_torch"] < 1e-3 for e in export["metrics"]["exports"].values())
    # validation carries the score error against the closed form per target
    fid = report["targets"]["raspberry-pi-5"]["fidelity"]
    assert fid["reference"] == "closed form" and fid["score_mse"] > 0

    broken = _yaml(tmp_path, example_score_model, "broken", 0.9, 0.2)
    assert main(["run", str(broken), "--workdir", str(tmp_path / "broken")]) == 1
    err = capsys.readouterr().err
    assert "tv_measured" in err and "validation failed" in err
    report_b, mb = _verify_metrics(tmp_path / "broken")  # written before the exit
    assert not report_b["ok"] and mb["gate"]["ok"] is False
    # the broken network's score error is larger, so are its certificate and its measured TV
    for name in ("host-cpu", "raspberry-pi-5"):
        assert mb["score_mse"]["per_target"][name] > m["score_mse"]["per_target"][name]
        assert mb["tv_certificate"]["per_target"][name] > m["tv_certificate"]["per_target"][name]
        assert mb["tv_measured"]["per_target"][name] > m["tv_measured"]["per_target"][name]
    # within one run: compressed worse than dense when its score error is larger
    for name, eps in mb["score_mse"]["per_target"].items():
        assert eps > mb["score_mse"]["dense"]
        assert mb["tv_certificate"]["per_target"][name] > mb["tv_certificate"]["dense"]


def _cli_run(tmp_path, model, name: str, stages: list) -> int:
    """``edgepipe run`` of a YAML file with ``stages`` on ``model`` for host-cpu; returns the exit code."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(model)}, "targets": ["host-cpu"], "stages": stages}))
    return main(["run", str(path), "--workdir", str(tmp_path / name)])


def test_bad_stage_config_is_one_line(tiny_score_model, tmp_path, capsys):
    assert _cli_run(tmp_path, tiny_score_model, "bad", [{"export": {}}, {"verify_diffusion": {"steps": 0}}]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "verify_diffusion.steps" in err[0]


def test_transformer_only_stage_refused(tiny_score_model, tmp_path, capsys):
    assert _cli_run(tmp_path, tiny_score_model, "attn", [{"recover": {}}]) == 2
    assert "does not apply to score networks" in capsys.readouterr().err


def test_prune_method_it_cannot_feed_refused(tiny_score_model, tmp_path, capsys):
    """sparsegpt reads the Hessian, which the score-network prune does not collect: one line naming what it takes."""
    assert _cli_run(tmp_path, tiny_score_model, "sgpt", [{"prune": {"method": "sparsegpt"}}]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # progress lines aside
    assert len(err) == 1 and "score networks support method magnitude/wanda" in err[0], err


def test_benchmark_times_each_target_in_its_bundle(tiny_score_model, tmp_path):
    import pipeline
    from exporters.onnx import model_bytes

    cfg = {
        "model": {"path": str(tiny_score_model)},
        "targets": ["host-cpu"],
        "stages": [{"export": {}}, {"benchmark": {"runs": 2, "warmup": 0, "batch": 4, "threads": 1}}],
    }
    report = pipeline.run(cfg, workdir=tmp_path / "run", progress=False)
    entry = report["stages"][-1]["metrics"]["targets"]["host-cpu"]
    assert entry["batch"] == 4 and entry["threads"] == 1 and entry["outputs_ok"] is True
    assert 0 < entry["latency_ms"]["p50"] <= entry["latency_ms"]["p95"] and entry["peak_rss_mb"] > 5
    assert entry["size_bytes"] == model_bytes(tmp_path / "run" / report["targets"]["host-cpu"]["artifact"])
    assert "seq" not in entry  # (x, t) points have no sequence length
