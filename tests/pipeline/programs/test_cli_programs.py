"""``edgepipe compile-program`` and the ``compile_program`` stage config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "programs"


def edgepipe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )


def test_compile_program_cli_targets_and_report(tmp_path):
    wd = tmp_path / "out"
    res = edgepipe(
        "compile-program",
        str(EXAMPLES / "multiply.sq"),
        "--memory",
        str(EXAMPLES / "memory_multiply.json"),
        "--target",
        "host-cpu",
        "--target",
        "android-arm64",
        "--workdir",
        str(wd),
        "--random-memories",
        "3",
        "--unroll",
        "8",
    )
    assert res.returncode == 0, res.stderr
    rep = json.loads((wd / "report.json").read_text())
    assert rep["ok"] and set(rep["targets"]) == {"host-cpu", "android-arm64"}
    for t in rep["targets"].values():
        assert set(t) == {"bit_exact", "steps_per_s", "size_bytes", "depth"}
        assert t["bit_exact"] == {"fp32": True, "int8": True} and t["depth"] == 6 and t["steps_per_s"] > 0
    assert rep["interpreter"]["memory"]["P"] == -54 and rep["int8"]["margin"] == 0.5
    host = wd / "host-cpu"
    assert {"program.fp32.onnx", "program.int8.onnx", "program.fp32.unrolled.onnx", "program.json"} <= {
        p.name for p in host.iterdir()
    }
    assert (
        rep["targets"]["host-cpu"]["size_bytes"] == (host / "program.fp32.onnx").stat().st_size
    )  # default precision fp32
    phone = wd / "android-arm64"
    assert (phone / "program.int8.ort").is_file() and rep["targets"]["android-arm64"]["size_bytes"] == (
        phone / "program.int8.ort"
    ).stat().st_size
    # the shipped program.json is enough to drive the graph
    meta = json.loads((host / "program.json").read_text())
    assert (
        meta["state"]["size"]
        == meta["machine"]["memory_cells"] * meta["machine"]["word_bits"] + meta["state"]["pc_bits"]
    )


@pytest.mark.parametrize(
    "setup, fragment",
    [
        ("bad_line", "prog.sq:2: unknown mnemonic 'mov'"),
        ("bad_memory", "mem.json: key 'Q': not a data label"),
        ("bad_target", "unknown target 'toaster'"),
        ("missing", "prog.sq: file not found"),
        ("bad_slots", "--program-slots: must be a power of two >= 2, got 12"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, setup, fragment):
    prog = tmp_path / "prog.sq"
    prog.write_text("subleq X, X\nmov X, X\nX: .word 1\n" if setup == "bad_line" else "subleq X, X\nX: .word 1\n")
    if setup == "missing":
        prog.unlink()
    mem = tmp_path / "mem.json"
    mem.write_text('{"Q": 1}')
    args = [str(prog), "--target", "toaster" if setup == "bad_target" else "host-cpu", "--workdir", str(tmp_path / "w")]
    if setup == "bad_memory":
        args += ["--memory", str(mem)]
    if setup == "bad_slots":
        args += ["--program-slots", "12"]
    res = edgepipe("compile-program", *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("edgepipe: error:")]
    assert len(lines) == 1 and fragment in lines[0], res.stderr
    assert not (tmp_path / "w").exists()


def test_a_failed_check_keeps_earlier_artifacts(tmp_path, monkeypatch, capsys):
    wd = tmp_path / "w"
    args = [
        "compile-program",
        str(EXAMPLES / "divide.sq"),
        "--target",
        "host-cpu",
        "--workdir",
        str(wd),
        "--random-memories",
        "1",
        "--quiet",
    ]
    assert main(args) == 0
    good = (wd / "host-cpu" / "program.fp32.onnx").read_bytes()
    # break the compiler: one flipped readout bias makes every run wrong
    import pipeline.programs.build as build

    real = build.compile_program

    def broken(*a, **k):
        cp = real(*a, **k)
        cp.net.readout_bias[0] += 1.0
        return cp

    monkeypatch.setattr(build, "compile_program", broken)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "not exact" in err and "host-cpu/fp32" in err
    assert json.loads((wd / "report.json").read_text())["ok"] is False
    assert (wd / "host-cpu" / "program.fp32.onnx").read_bytes() == good
    assert not any(p.name.startswith(".") and p.name != ".edgepipe-run" for p in wd.iterdir())  # no temp debris


def test_wrong_expect_line_blames_the_program_not_the_compiler(tmp_path, capsys):
    # the interpreter ends with X = 0; the file claims 5: the network is exact, the expectation is wrong
    prog = tmp_path / "count.sq"
    prog.write_text("loop: subleq ONE, X, done\njmp loop\ndone: halt\nX: .word 3\nONE: .word 1\n; expect X = 5\n")
    wd = tmp_path / "out"
    args = ["compile-program", str(prog), "--target", "host-cpu", "--workdir", str(wd), "--random-memories", "1"]
    assert main([*args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not exact" not in err and "X = 0 (the file expects 5)" in err and str(prog) in err
    rep = json.loads((wd / "report.json").read_text())
    assert rep["expect"]["X"] == {"expected": 5, "got": 0, "ok": False}
    assert all(v for v in rep["targets"]["host-cpu"]["bit_exact"].values())


def test_stage_config_is_closed_and_typed():
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    cfg = parse_config(
        {
            "targets": ["host-cpu"],
            "stages": [
                {"compile_program": {"program": "x.sq", "memory": {"X": 3, "A": [1, 2]}, "construction": "paper23"}}
            ],
        }
    )
    st = cfg.stages[0]
    assert st.kind == "compile_program" and st.construction == "paper23" and st.program_in == "weights"
    with pytest.raises(ConfigError, match="unknown key 'constrution'"):
        parse_config({"stages": [{"compile_program": {"program": "x.sq", "constrution": "paper23"}}]})
    with pytest.raises(ConfigError, match="construction"):
        parse_config({"stages": [{"compile_program": {"program": "x.sq", "construction": "deep"}}]})


def test_stage_input_digest_follows_the_file(tmp_path):
    from pipeline.stages.compile_program import CompileProgramConfig

    p = tmp_path / "p.sq"
    p.write_text("subleq X, X\nX: .word 1\n")
    cfg = CompileProgramConfig(program=str(p))
    d1 = cfg.input_digest()
    p.write_text("subleq X, X\nX: .word 2\n")
    assert cfg.input_digest() != d1


def test_stage_in_a_pipeline_publishes_and_caches_by_file_content(tmp_path):
    import pipeline

    prog = tmp_path / "count.sq"
    prog.write_text("loop: subleq ONE, X, done\njmp loop\ndone: halt\nX: .word 3\nONE: .word 1\n; expect X = 0\n")
    cfg = {
        "targets": ["host-cpu"],
        "stages": [{"compile_program": {"program": str(prog), "random_memories": 1, "max_steps": 300}}],
    }
    wd = tmp_path / "run"
    rep = pipeline.run(cfg, workdir=wd, progress=False)
    m = rep["stages"][0]["metrics"]
    assert rep["ok"] and rep["stages"][0]["status"] == "ran"
    assert m["targets"]["host-cpu"]["bit_exact"] == {"fp32": True, "int8": True} and set(m["targets"]["host-cpu"]) == {
        "bit_exact",
        "steps_per_s",
        "size_bytes",
        "depth",
    }
    assert (wd / "host-cpu" / "program" / "program.int8.onnx").is_file() and (wd / "host-cpu" / "model.onnx").is_file()
    assert pipeline.run(cfg, workdir=wd, progress=False)["stages"][0]["status"] == "cached"
    prog.write_text(prog.read_text().replace(".word 3", ".word 4"))
    rep = pipeline.run(cfg, workdir=wd, progress=False)
    assert (
        rep["stages"][0]["status"] == "ran"
        and rep["stages"][0]["metrics"]["interpreter"]["steps"] > m["interpreter"]["steps"]
    )


def test_network_over_the_memory_budget_is_refused(tmp_path, capsys):
    prof = tmp_path / "tiny.yaml"
    prof.write_text(
        (REPO / "targets" / "profiles" / "raspberry-pi-5.yaml")
        .read_text()
        .replace("name: raspberry-pi-5", "name: tiny")
        .replace("memory_budget_mb: ", "memory_budget_mb: 1 #")
    )
    prog = tmp_path / "p.sq"
    prog.write_text("subleq X, Y\nhalt\nX: .word 1\nY: .zero 60\n")
    assert main(["compile-program", str(prog), "--target", str(prof), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "target 'tiny': the compiled network needs" in err and "memory_budget_mb (1)" in err
    assert not (tmp_path / "w" / "tiny").exists()


def test_stage_without_a_program_says_so(tmp_path):
    import pipeline
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stages\[0\]\.compile_program: program: required"):
        pipeline.run(
            {"targets": ["host-cpu"], "stages": [{"compile_program": {}}]}, workdir=tmp_path / "r", progress=False
        )


def test_compile_program_owns_only_its_own_folders(tmp_path, capsys):
    """Like `edgepipe run`: a non-empty folder edgepipe did not make is refused and left byte-identical; a run
    folder and a compile-program folder are not mixed; the command's own folder is reused."""
    prog = str(EXAMPLES / "multiply.sq")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("MY NOTES")
    assert main(["compile-program", prog, "--target", "host-cpu", "--workdir", str(mine)]) == 2
    assert (mine / "report.json").read_text() == "MY NOTES" and sorted(p.name for p in mine.iterdir()) == [
        "report.json"
    ]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an edgepipe run folder" in err[0]

    own = tmp_path / "own"
    for _ in range(2):
        assert (
            main(["compile-program", prog, "--target", "host-cpu", "--workdir", str(own), "--random-memories", "1"])
            == 0
        )
    capsys.readouterr()
    assert main(["run", "--workdir", str(own)]) == 2
    assert "holds the results of an edgepipe compile-program" in capsys.readouterr().err

    run = tmp_path / "run"
    run.mkdir()
    (run / ".edgepipe-run").write_text('{"edgepipe": "0.1.0"}\n')  # a run folder from before markers named a kind
    (run / "report.json").write_text("RUN REPORT")
    assert main(["compile-program", prog, "--target", "host-cpu", "--workdir", str(run)]) == 2
    assert (run / "report.json").read_text() == "RUN REPORT"


@pytest.mark.parametrize(
    "stage, fragment",
    [
        ({"program": "bad.sq"}, "bad.sq:1: unknown mnemonic 'bogus'"),
        ({"program": str(EXAMPLES / "multiply.sq"), "memory": {"Q": 1}}, "key 'Q': not a data label"),
        ({}, "program: required key is missing"),
    ],
)
def test_validate_finds_a_bad_program_before_anything_runs(tmp_path, capsys, stage, fragment):
    import yaml

    (tmp_path / "bad.sq").write_text("bogus instr\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"targets": ["host-cpu"], "stages": [{"export": {}}, {"compile_program": stage}]}))
    assert main(["validate", str(cfg)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "stages[1].compile_program" in line and fragment in line
