"""The SUBLEQ machine edgepipe compiles: its sizes, its programs, and the reference interpreter (the oracle).

SUBLEQ(a, b, c) (Giannou et al. 2023 convention, arXiv 2301.13196; as in arXiv 2410.09375):
``mem[b] <- mem[b] - mem[a]``; if the new ``mem[b] <= 0`` then ``PC <- c`` else ``PC <- (PC + 1) mod I``.
Words are N-bit two's complement, so the subtraction wraps. Code and data are separate (a Harvard machine):
``a, b`` address one of M memory cells, ``c`` one of I instruction slots.

Halting is a fixed point: a step that changes neither memory nor PC (e.g. ``subleq Z, Z, self`` with ``Z = 0``)
would repeat forever, so the machine has halted. Both the interpreter and the compiled network stop at the
first such step; ``steps`` counts the steps that changed the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["MachineSpec", "Program", "RunResult", "interpret", "random_program", "wrap"]


def wrap(v: int, bits: int) -> int:
    """``v`` as an N-bit two's-complement integer, in [-2^(N-1), 2^(N-1))."""
    m = 1 << bits
    v %= m
    return v - m if v >= m >> 1 else v


@dataclass(frozen=True)
class MachineSpec:
    """Machine sizes.

    Args:
        word_bits: N, the word size in bits (two's complement), 2..32.
        memory_cells: M, memory cells (any M >= 1).
        program_slots: I, instruction slots; a power of two (PC + 1 wraps mod I).
    """

    word_bits: int
    memory_cells: int
    program_slots: int

    def __post_init__(self) -> None:
        if not 2 <= self.word_bits <= 32:
            raise ValueError(f"word_bits must be in 2..32, got {self.word_bits}")
        if self.memory_cells < 1:
            raise ValueError(f"memory_cells must be >= 1, got {self.memory_cells}")
        i = self.program_slots
        if i < 2 or i & (i - 1):
            raise ValueError(f"program_slots must be a power of two >= 2, got {i}")

    @property
    def pc_bits(self) -> int:
        return self.program_slots.bit_length() - 1

    @property
    def addr_bits(self) -> int:
        """Bits of a memory address (at least 1)."""
        return max(1, (self.memory_cells - 1).bit_length())

    @property
    def word_min(self) -> int:
        return -(1 << (self.word_bits - 1))

    @property
    def word_max(self) -> int:
        return (1 << (self.word_bits - 1)) - 1


@dataclass(frozen=True)
class Program:
    """An assembled program: the full instruction table (length I) and the initial memory (length M).

    ``labels`` maps data labels to cell addresses and code labels to slots (for reading results by name).
    """

    spec: MachineSpec
    code: tuple[tuple[int, int, int], ...]
    memory: tuple[int, ...]
    data_labels: dict[str, int] = field(default_factory=dict)
    code_labels: dict[str, int] = field(default_factory=dict)
    source: str = "<program>"
    expect: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = self.spec
        if len(self.code) != s.program_slots:
            raise ValueError(f"code has {len(self.code)} slots, the machine has {s.program_slots}")
        if len(self.memory) != s.memory_cells:
            raise ValueError(f"memory has {len(self.memory)} cells, the machine has {s.memory_cells}")
        for j, (a, b, c) in enumerate(self.code):
            if not (0 <= a < s.memory_cells and 0 <= b < s.memory_cells and 0 <= c < s.program_slots):
                raise ValueError(f"slot {j}: ({a}, {b}, {c}) out of range for M={s.memory_cells}, I={s.program_slots}")
        for j, v in enumerate(self.memory):
            if not s.word_min <= v <= s.word_max:
                raise ValueError(f"cell {j}: {v} does not fit {s.word_bits}-bit two's complement")

    def with_memory(self, memory: Sequence[int]) -> Program:
        """The same code with other initial memory (values must fit the word)."""
        return Program(
            self.spec,
            self.code,
            tuple(int(v) for v in memory),
            self.data_labels,
            self.code_labels,
            self.source,
            self.expect,
        )


@dataclass(frozen=True)
class RunResult:
    """Where a run stopped.

    ``status`` is ``"halted"`` (a fixed point was reached within the budget) or ``"budget_exhausted"`` (the
    budget of steps ran out first); ``steps`` counts the state-changing steps executed.
    """

    memory: tuple[int, ...]
    pc: int
    steps: int
    status: str

    @property
    def halted(self) -> bool:
        return self.status == "halted"


def interpret(program: Program, max_steps: int, *, memory: Sequence[int] | None = None, pc: int = 0) -> RunResult:
    """Run ``program`` for at most ``max_steps`` iterations (the float64-free oracle of the compiled network).

    Each iteration executes one instruction; an iteration that changes nothing is the halting fixed point.
    """
    s = program.spec
    mem = list(program.memory if memory is None else memory)
    steps = 0
    for _ in range(max_steps):
        a, b, c = program.code[pc]
        res = wrap(mem[b] - mem[a], s.word_bits)
        new_pc = c if res <= 0 else (pc + 1) % s.program_slots
        if res == mem[b] and new_pc == pc:
            return RunResult(tuple(mem), pc, steps, "halted")
        mem[b] = res
        pc = new_pc
        steps += 1
    return RunResult(tuple(mem), pc, steps, "budget_exhausted")


def random_program(spec: MachineSpec, rng: np.random.Generator, *, halt_slot: bool = True) -> Program:
    """A random instruction table and memory (tests, benchmarks). ``halt_slot`` puts a halt idiom
    (``subleq Z, Z, self`` on a zero cell) in the last slot so some runs halt."""
    M, I = spec.memory_cells, spec.program_slots
    code = [(int(rng.integers(M)), int(rng.integers(M)), int(rng.integers(I))) for _ in range(I)]
    mem = [int(v) for v in rng.integers(spec.word_min, spec.word_max + 1, size=M)]
    if halt_slot and M >= 2:
        z = M - 1
        mem[z] = 0
        code[-1] = (z, z, I - 1)
        # nothing else writes the zero cell, so the halt slot stays a fixed point
        code = [
            (a, b if b != z else (b + 1) % (M - 1), c) if j < I - 1 else (a, b, c) for j, (a, b, c) in enumerate(code)
        ]
    return Program(spec, tuple(code), tuple(mem))
