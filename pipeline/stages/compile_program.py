"""compile_program: compile a SUBLEQ program into looped ReLU-MLP ONNX models for every target, each checked
bit-exactly against the interpreter (fp32 and, where the target supports it, int8). See pipeline/programs/."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.artifact import Artifact, TargetModel
from pipeline.programs.build import BuildOptions, build_targets, shipped_precisions
from pipeline.programs.compile import CONSTRUCTIONS, PROGRAM_IN, Construction, ProgramIn
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage

__all__ = ["CompileProgramConfig", "run_compile_program"]


class CompileProgramConfig(StageConfig):
    kind = "compile_program"
    works_on = "any"
    path_fields = ("program", "memory")
    program: str | None = Field(
        None, description="SUBLEQ assembly file (.sq), required; a relative path is taken from the YAML's folder"
    )
    memory: str | dict[str, int | list[int]] | None = Field(
        None, description="initial memory overrides: {label: value or [values]}, or a JSON file holding that mapping"
    )
    word_bits: int | None = Field(None, ge=2, le=32, description="N (default: the program's .bits, else 8)")
    memory_cells: int | None = Field(None, ge=1, description="M (default: the cells the program declares)")
    program_slots: int | None = Field(
        None, ge=2, description="I, a power of two (default: the smallest that holds the code)"
    )
    construction: Construction = Field(
        CONSTRUCTIONS[0], description="shallow, or paper23 (the paper's 23-layer budget)"
    )
    program_in: ProgramIn = Field(
        PROGRAM_IN[0], description="weights: the code is baked into the weights; state: it lives in the state vector"
    )
    max_steps: int = Field(10_000, ge=1, description="step budget of the parity runs")
    random_memories: int = Field(8, ge=0, description="random memories checked besides the given one")
    unroll_steps: int | None = Field(None, ge=1, description="also ship an unrolled graph of this many steps")
    sparse: Literal["auto", "always", "never"] = Field(
        "auto", description="sparse weight storage: auto = where it shrinks the file"
    )

    def assemble(self):
        """The program with its memory applied (one-line ConfigError on a malformed program or memory)."""
        from pipeline.errors import ConfigError
        from pipeline.programs.asm import apply_memory, assemble_file, read_memory_file

        if self.program is None:
            raise ConfigError("program: required key is missing (the .sq file to compile)")
        sizes = {
            k: v
            for k, v in {
                "word_bits": self.word_bits,
                "memory_cells": self.memory_cells,
                "program_slots": self.program_slots,
            }.items()
            if v is not None
        }
        prog = assemble_file(self.program, **sizes)
        if self.memory is not None:
            values = read_memory_file(self.memory) if isinstance(self.memory, str) else self.memory
            prog = apply_memory(
                prog, values, source=self.memory if isinstance(self.memory, str) else "compile_program.memory"
            )
        return prog

    def check(self, plan: RunPlan) -> None:
        """Assemble before anything runs, so ``edgepipe validate`` finds a malformed program or memory."""
        from pipeline.errors import ConfigError

        try:
            self.assemble()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


@register_stage(CompileProgramConfig, version=1)
def run_compile_program(art: Artifact, cfg: CompileProgramConfig, ctx: StageContext) -> Artifact:
    """Compile a SUBLEQ program to looped ReLU-MLP ONNX per target, bit-exact against the interpreter."""
    from pipeline.errors import ConfigError

    try:
        prog = cfg.assemble()
    except ConfigError as exc:
        raise ConfigError(f"stages[{ctx.index}].compile_program: {exc}") from None
    opts = BuildOptions(
        construction=cfg.construction,
        program_in=cfg.program_in,
        max_steps=cfg.max_steps,
        random_memories=cfg.random_memories,
        unroll_steps=cfg.unroll_steps,
        sparse=cfg.sparse,
        seed=ctx.run.seed,
    )
    root = ctx.subdir("programs")
    rep = build_targets(prog, ctx.targets, root, opts)
    for n, t in rep["targets"].items():
        ctx.log.info(
            "%s: bit-exact %s, %.0f steps/s, %d bytes, depth %d",
            n,
            {k: v for k, v in t["bit_exact"].items() if v is not None},
            t["steps_per_s"],
            t["size_bytes"],
            t["depth"],
        )
    failures = [
        {"target": n, "check": f"compile_program bit_exact {p}", "value": v, "limit": True}
        for n, t in rep["targets"].items()
        for p, v in t["bit_exact"].items()
        if v is False
    ]
    failures += [
        {"target": "-", "check": f"compile_program expect {k}", "value": e["got"], "limit": e["expected"]}
        for k, e in rep["expect"].items()
        if not e["ok"]
    ]
    ctx.metrics.update(
        {
            "targets": rep["targets"],
            "program": rep["program"],
            "machine": rep["machine"],
            "construction": rep["construction"],
            "program_in": rep["program_in"],
            "network": rep["network"],
            "int8": rep["int8"],
            "interpreter": rep["interpreter"],
            **({"failures": failures} if failures else {}),
        }
    )
    out = art
    for name, prof in ctx.targets.items():
        ref = ctx.ref(root / name)
        tm = art.targets.get(name)
        if tm is not None:  # ship the program next to the target's model
            out = out.with_target(
                name,
                TargetModel(
                    model=tm.model,
                    precision=tm.precision,
                    io=tm.io,
                    files={**tm.files, "program": ref},
                    metrics=tm.metrics,
                ),
            )
        else:  # no model in this pipeline: the program is the target's model
            precision = shipped_precisions(prof)[0]
            out = out.with_target(
                name,
                TargetModel(
                    model=ctx.ref(root / name / f"program.{precision}.onnx"),
                    precision=precision,
                    io={"input_names": ["state", "max_steps"], "output_names": ["final_state", "steps", "halted"]},
                    files={"program": ref},
                ),
            )
    return out
