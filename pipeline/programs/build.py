"""Compile a program for a set of target profiles, check every shipped file against the interpreter, and report.

Used by ``edgepipe compile-program`` and by the ``compile_program`` stage. For each target it writes, into
``out_dir/<target>/``: ``program.<precision>.onnx`` (the Loop graph) for each precision the profile supports out
of fp32 and int8, ``.ort`` files where the profile ships ORT format, ``program.<precision>.unrolled.onnx`` when
asked, and ``program.json`` (machine sizes, state layout, labels, initial memory) to encode inputs and read results.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.artifact import atomic_write_json
from pipeline.programs.compile import CompiledProgram, compile_program
from pipeline.programs.execute import OrtProgram
from pipeline.programs.machine import Program, interpret
from pipeline.programs.onnx_export import OPSET, PRECISIONS, check_int8, export_onnx

__all__ = ["BuildOptions", "build_targets", "parity", "program_manifest", "shipped_precisions", "steps_per_second"]

log = logging.getLogger("edgepipe.programs")


@dataclass(frozen=True)
class BuildOptions:
    """How to compile and check (see the stage config for the meaning of each field)."""

    construction: str = "shallow"
    program_in: str = "weights"
    max_steps: int = 10_000
    random_memories: int = 8
    unroll_steps: int | None = None
    sparse: Literal["auto", "always", "never"] = "auto"
    seed: int = 0
    timing_seconds: float = 0.3


def shipped_precisions(profile: Any) -> list[str]:
    """The profile's precisions that a compiled program can be shipped in, in the profile's order (default first)."""
    return [p for p in profile.precisions if p in PRECISIONS]


def parity(
    prog: Program, cp: CompiledProgram, runner: OrtProgram, memories: list[tuple[int, ...]], max_steps: int
) -> dict[str, Any]:
    """Run all ``memories`` as one batch in ONNX Runtime and compare memory, PC, steps and status with the
    interpreter. Returns ``{"bit_exact": bool, "runs": n, "mismatches": [...]}`` (at most 5 mismatches listed)."""
    states = np.stack([cp.layout.encode(prog, m) for m in memories])
    out, steps, halted = runner.run(states, max_steps)
    bad: list[dict[str, Any]] = []
    for i, m in enumerate(memories):
        ref = interpret(prog, max_steps, memory=m)
        try:
            mem, pc = cp.layout.decode(out[i])
        except ValueError as exc:
            bad.append({"run": i, "problem": str(exc)})
            continue
        got = (mem, pc, int(steps[i]), bool(halted[i]))
        if got != (ref.memory, ref.pc, ref.steps, ref.halted):
            bad.append(
                {
                    "run": i,
                    "expected": {"memory": ref.memory, "pc": ref.pc, "steps": ref.steps, "halted": ref.halted},
                    "got": {"memory": mem, "pc": pc, "steps": got[2], "halted": got[3]},
                }
            )
    return {"bit_exact": not bad, "runs": len(memories), "mismatches": bad[:5]}


def steps_per_second(runner: OrtProgram, state: np.ndarray, max_steps: int, *, seconds: float = 0.3) -> float:
    """Loop iterations per second of one run (batch 1) on this host, best of repeated runs for ~``seconds``.
    For an unrolled graph ``max_steps`` must be its T."""
    feeds_state = np.atleast_2d(state)
    best = float("inf")
    t_end = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        _, steps, halted = runner.run(feeds_state, max_steps)
        dt = time.perf_counter() - t0
        iters = int(steps[0]) + 1 if bool(halted[0]) else max_steps
        best = min(best, dt)
        runs += 1
        if runs >= 50:
            break
    return iters / best


def random_memories(prog: Program, n: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` random memories: every cell gets a random word except the assembler's own cells (``__Z``, which its
    ``halt`` and ``jmp`` rely on)."""
    rng = np.random.default_rng(seed)
    s = prog.spec
    fixed = {v for k, v in prog.data_labels.items() if k.startswith("__")}
    out = []
    for _ in range(n):
        mem = [
            int(v) if j in fixed else int(rng.integers(s.word_min, s.word_max + 1)) for j, v in enumerate(prog.memory)
        ]
        out.append(tuple(mem))
    return out


def program_manifest(prog: Program, cp: CompiledProgram) -> dict[str, Any]:
    """What a user needs to feed and read the exported graph (written as ``program.json``)."""
    lay = cp.layout
    s = prog.spec
    return {
        "machine": {"word_bits": s.word_bits, "memory_cells": s.memory_cells, "program_slots": s.program_slots},
        "construction": cp.construction,
        "program_in": lay.program_in,
        "state": {
            "size": lay.size,
            "memory_offset": lay.mem_offset,
            "pc_offset": lay.pc_offset,
            "pc_bits": s.pc_bits,
            "code_offset": lay.inst_offset if lay.program_in == "state" else None,
            "bit_order": "cell-major, least significant bit first; two's complement",
        },
        "data_labels": dict(prog.data_labels),
        "code_labels": dict(prog.code_labels),
        "initial_memory": list(prog.memory),
        "code": [list(i) for i in prog.code],
        "io": {
            "inputs": ["state (batch, D) float32", "max_steps () int64"],
            "outputs": ["final_state (batch, D) float32", "steps (batch,) int64", "halted (batch,) bool"],
        },
        "opset": OPSET,
    }


def build_targets(prog: Program, profiles: Mapping[str, Any], out_dir: Path, opts: BuildOptions) -> dict[str, Any]:
    """Compile ``prog`` once, export it for every target into ``out_dir/<target>/`` and check each shipped file.

    Returns the report: ``targets`` maps each name to exactly ``{bit_exact: {fp32, int8}, steps_per_s, size_bytes,
    depth}`` (``None`` for a precision the target does not support); the rest describes the program, the network
    (depth, widths, weights, sparsity), the int8 margin and the interpreter's result.

    Raises:
        pipeline.errors.TargetError: a profile whose opset is below the graph's, or with no precision a program can
            ship in.
        Int8MarginError: int8 is needed by a target but the rounding check refuses it.
    """
    from exporters.mobile import to_ort_format
    from pipeline.errors import TargetError

    for name, prof in profiles.items():
        if prof.opset < OPSET:
            raise TargetError(f"target '{name}': runs ONNX opset <= {prof.opset}, compiled programs need opset {OPSET}")
        if not shipped_precisions(prof):
            raise TargetError(
                f"target '{name}': none of its precisions {prof.precisions} can ship a compiled program (needs one of {list(PRECISIONS)})"
            )
    t0 = time.perf_counter()
    cp = compile_program(prog, construction=opts.construction, program_in=opts.program_in)
    compile_s = time.perf_counter() - t0
    dense = sum(o * i for o, i in cp.net.shapes())
    for name, prof in profiles.items():
        # ONNX Runtime densifies the weights when the session starts: they must fit the device
        mb = dense * (1 if shipped_precisions(prof)[0] == "int8" else 4) / 2**20
        if mb > prof.memory_budget_mb:
            raise TargetError(
                f"target '{name}': the compiled network needs {mb:,.0f} MB of dense {shipped_precisions(prof)[0]} weights at run time, "
                f"over the profile's memory_budget_mb ({prof.memory_budget_mb}); use a smaller machine (N, M, I) or the shallow construction"
            )
    ref = interpret(prog, opts.max_steps)
    memories = [prog.memory] + random_memories(prog, opts.random_memories, opts.seed)
    int8 = check_int8(cp.net)
    manifest = program_manifest(prog, cp)
    targets: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name, prof in profiles.items():
        tdir = out_dir / name
        tdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(tdir / "program.json", manifest)
        bit_exact: dict[str, bool | None] = {p: None for p in PRECISIONS}
        files: dict[str, str] = {}
        checks: dict[str, Any] = {}
        shipped: dict[str, Path] = {}
        threads = min(prof.threads or 1, os.cpu_count() or 1)  # the profile's threads, capped at this host's cores
        for precision in shipped_precisions(prof):
            res = export_onnx(cp, tdir / f"program.{precision}.onnx", precision=precision, sparse=opts.sparse)
            ship = res.path
            files[precision] = res.path.name
            if prof.ort_format:
                ort_res = to_ort_format(res.path, tdir)
                ship = ort_res.ort_path
                files[f"{precision}_ort"] = ort_res.ort_path.name
            runner = OrtProgram(ship, threads=threads, providers=prof.providers)
            chk = parity(prog, cp, runner, memories, opts.max_steps)
            if opts.unroll_steps:
                un = export_onnx(
                    cp,
                    tdir / f"program.{precision}.unrolled.onnx",
                    precision=precision,
                    variant="unrolled",
                    unroll_steps=opts.unroll_steps,
                    sparse=opts.sparse,
                )
                files[f"{precision}_unrolled"] = un.path.name
                u_chk = parity(
                    prog,
                    cp,
                    OrtProgram(un.path, threads=threads, providers=prof.providers),
                    memories,
                    opts.unroll_steps,
                )
                chk = {**chk, "unrolled": u_chk, "bit_exact": chk["bit_exact"] and u_chk["bit_exact"]}
            bit_exact[precision] = chk["bit_exact"]
            checks[precision] = chk
            shipped[precision] = ship
        default = shipped_precisions(prof)[0]
        runner = OrtProgram(shipped[default], threads=threads, providers=prof.providers)
        sps = steps_per_second(runner, cp.layout.encode(prog)[None], opts.max_steps, seconds=opts.timing_seconds)
        targets[name] = {
            "bit_exact": bit_exact,
            "steps_per_s": round(sps, 1),
            "size_bytes": shipped[default].stat().st_size,
            "depth": cp.net.depth,
        }
        details[name] = {
            "precision": default,
            "shipped": shipped[default].name,
            "files": files,
            "parity": checks,
            "threads": threads,
        }
        log.debug(
            "%s: bit-exact %s, %.0f steps/s, %d bytes",
            name,
            {k: v for k, v in bit_exact.items() if v is not None},
            sps,
            shipped[default].stat().st_size,
        )
    ok = all(v is not False for t in targets.values() for v in t["bit_exact"].values())
    expect = {}
    if prog.expect:
        for key, val in prog.expect.items():
            label, _, idx = key.partition("[")
            addr = prog.data_labels[label] + (int(idx[:-1]) if idx else 0)
            expect[key] = {"expected": val, "got": ref.memory[addr], "ok": ref.memory[addr] == val}
    return {
        "program": prog.source,
        "machine": manifest["machine"],
        "construction": cp.construction,
        "program_in": cp.layout.program_in,
        "max_steps": opts.max_steps,
        "network": {**cp.net.stats(), "state_size": cp.layout.size, "compile_seconds": round(compile_s, 3)},
        "int8": {
            "margin": int8.margin,
            "max_weight": int8.max_weight,
            "max_activation": int8.max_activation,
            "max_accumulator": int8.max_accumulator,
            "accepted": int8.ok,
            "problems": list(int8.problems),
        },
        "interpreter": {
            "status": ref.status,
            "steps": ref.steps,
            "pc": ref.pc,
            "memory": {k: ref.memory[v] for k, v in prog.data_labels.items() if not k.startswith("__")},
        },
        "expect": expect,
        "parity_memories": len(memories),
        "targets": targets,
        "target_details": details,
        "ok": ok and all(e["ok"] for e in expect.values()),
    }


def compile_to_workdir(
    program_path: Path,
    workdir: Path,
    targets: list[str],
    opts: BuildOptions,
    *,
    memory_path: Path | None = None,
    sizes: Mapping[str, int | None] | None = None,
) -> dict[str, Any]:
    """``edgepipe compile-program``: assemble, build every target in a hidden temp folder, then publish
    ``workdir/<target>/`` (each replaced atomically) and ``workdir/report.json``.

    Nothing is published when a check fails: the report is written (``ok: false``) and
    :class:`pipeline.errors.ValidationFailed` raised, so earlier good artifacts stay. Bad input (program, memory
    file, target, sizes) raises a one-line :class:`pipeline.errors.ConfigError` before anything is written.
    """
    import shutil

    from pipeline.artifact import make_temp_dir, replace_dir
    from pipeline.errors import ConfigError, ValidationFailed
    from pipeline.programs.asm import apply_memory, assemble_file, read_memory_file
    from pipeline.workdir import check_workdir, mark_folder
    from targets import load_target

    sizes = {k: v for k, v in (sizes or {}).items() if v is not None}
    prog = assemble_file(program_path, **sizes)
    if memory_path is not None:
        prog = apply_memory(prog, read_memory_file(memory_path), source=str(memory_path))
    profiles: dict[str, Any] = {}
    for ref in targets:
        prof = load_target(ref)
        if prof.name in profiles:
            raise ConfigError(f"--target: '{prof.name}' given twice")
        profiles[prof.name] = prof
    if not profiles:
        raise ConfigError("--target: give at least one target")
    # the same ownership rule as `edgepipe run`: a new, empty or edgepipe-made compile-program folder only
    workdir = check_workdir(workdir, None, kind="compile-program")
    if workdir.is_symlink():
        raise ConfigError(f"--workdir: '{workdir}' is not a folder edgepipe can write into")
    workdir.mkdir(parents=True, exist_ok=True)
    mark_folder(workdir, "compile-program")
    tmp = make_temp_dir(workdir, ".compile.tmp-")
    try:
        report = build_targets(prog, profiles, tmp, opts)
        report["workdir"] = str(workdir)
        if report["ok"]:
            for name in profiles:
                replace_dir(tmp / name, workdir / name)
        atomic_write_json(workdir / "report.json", report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not report["ok"]:
        failed = [f"{n}/{p}" for n, t in report["targets"].items() for p, v in t["bit_exact"].items() if v is False]
        if failed:
            raise ValidationFailed(
                f"compiled program is not exact on {', '.join(failed)}; see {workdir / 'report.json'}"
            )
        # the network matched the interpreter everywhere: the program's own '; expect' lines are what failed
        wrong = [
            f"{k} = {e['got']} (the file expects {e['expected']})" for k, e in report["expect"].items() if not e["ok"]
        ]
        raise ValidationFailed(
            f"{program_path}: the program's '; expect' check failed: the reference interpreter ends with "
            f"{', '.join(wrong)}; the compiled network matches the interpreter, so the program or its expect "
            f"line is wrong; see {workdir / 'report.json'}"
        )
    return report
