"""Compiled weights vs the interpreter, step by step in float64 (the oracle of the exported graphs)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.programs.compile import PAPER_BUDGET, compile_machine, compile_program
from pipeline.programs.machine import MachineSpec, Program, interpret, random_program

SIZES = [(8, 8, 8), (3, 5, 4), (5, 3, 2), (6, 7, 16), (16, 12, 8)]  # (N, M, I), odd sizes included


def _lockstep(prog: Program, cp, steps: int, memory=None) -> None:
    """Run net and interpreter side by side for ``steps`` single steps from ``memory``; every state must match."""
    mem = tuple(prog.memory if memory is None else memory)
    pc = 0
    s = cp.layout.encode(prog, mem)[None].astype(np.float64)
    for k in range(steps):
        s = cp.net.step(s)
        ref = interpret(prog, 1, memory=mem, pc=pc)
        if ref.status == "halted":  # the fixed point: the net must leave the state unchanged
            assert cp.layout.decode(s[0]) == (mem, pc), f"step {k}: moved away from the halting fixed point"
            continue
        got = cp.layout.decode(s[0])
        assert got == (ref.memory, ref.pc), f"step {k}: net {got} != interpreter {(ref.memory, ref.pc)}"
        mem, pc = ref.memory, ref.pc


@pytest.mark.parametrize("construction", ["shallow", "paper23"])
@pytest.mark.parametrize("program_in", ["weights", "state"])
@pytest.mark.parametrize("nmi", SIZES)
def test_random_programs_bit_exact(nmi, construction, program_in):
    rng = np.random.default_rng(hash((nmi, construction, program_in)) % 2**32)
    spec = MachineSpec(*nmi)
    for trial in range(3):
        prog = random_program(spec, rng, halt_slot=bool(trial % 2))
        cp = compile_program(prog, construction=construction, program_in=program_in)
        _lockstep(prog, cp, 25)
        other = [int(v) for v in rng.integers(spec.word_min, spec.word_max + 1, size=spec.memory_cells)]
        _lockstep(prog, cp, 10, memory=other)


def test_one_state_network_runs_any_program():
    spec = MachineSpec(6, 6, 8)
    rng = np.random.default_rng(7)
    cp = compile_machine(spec, construction="shallow")  # program_in = state
    for _ in range(4):
        _lockstep(random_program(spec, rng), cp, 20)


@pytest.mark.parametrize("construction", ["shallow", "paper23"])
def test_negative_numbers_and_wraparound(construction):
    spec = MachineSpec(8, 4, 4)
    # mem[1] -= mem[0] three times: -128 - 1 wraps to 127; 127 - (-128) wraps to -1; -1 - 0 = -1 <= 0 branches
    prog = Program(spec, ((0, 1, 1), (2, 1, 2), (3, 1, 3), (3, 3, 3)), (1, -128, -128, 0))
    cp = compile_program(prog, construction=construction)
    _lockstep(prog, cp, 6)
    assert interpret(prog, 10).memory == (1, -1, -128, 0)


def test_halting_fixed_point_is_exact():
    spec = MachineSpec(8, 4, 4)
    z = 3
    prog = Program(spec, ((0, 1, 2), (z, z, 1), (z, z, 2), (z, z, 3)), (5, 9, 0, 0))
    ref = interpret(prog, 50)
    assert ref.status == "halted" and ref.pc == 1 and ref.memory == (5, 4, 0, 0)
    for construction in ("shallow", "paper23"):
        cp = compile_program(prog, construction=construction)
        s = cp.layout.encode(prog, ref.memory, pc=ref.pc)[None]
        for _ in range(5):
            s2 = cp.net.step(s)
            assert np.array_equal(s2, s)  # exactly the same bits, step after step
            s = s2


def test_depths_widths_and_budget():
    spec = MachineSpec(8, 8, 8)
    prog = random_program(spec, np.random.default_rng(0))
    st = {
        (c, p): compile_program(prog, construction=c, program_in=p).stats()
        for c in ("shallow", "paper23")
        for p in ("weights", "state")
    }
    assert st["shallow", "weights"]["depth"] == 6 and st["shallow", "state"]["depth"] == 8
    assert st["paper23", "weights"]["depth"] == st["paper23", "state"]["depth"] == sum(n for _, n in PAPER_BUDGET) == 23
    for s in st.values():
        assert 0.9 < s["sparsity"] < 1 and s["nonzeros"] < s["weights"] and len(s["widths"]) == s["depth"] + 1
    # every weight and bias is a small integer: pre-activations stay integers (fp32 and int8 exact)
    cp = compile_program(prog, construction="paper23", program_in="state")
    for (_, _, v), b in zip(cp.net.coo(), cp.net.all_biases()):
        assert np.array_equal(v, np.rint(v)) and np.abs(v).max() <= 2
        assert np.array_equal(b, np.rint(b)) and np.abs(b).max() <= spec.word_bits + 2


def test_word_size_32_stays_exact_in_float32():
    spec = MachineSpec(32, 3, 2)
    prog = Program(spec, ((0, 1, 1), (0, 2, 0)), (2**31 - 1, -(2**31), 123456789))
    cp = compile_program(prog)
    mem, pc = prog.memory, 0
    s = cp.layout.encode(prog)[None]
    for _ in range(6):
        W = [(w.astype(np.float32), b.astype(np.float32)) for w, b in cp.net.dense(np.float32)]
        h = s.astype(np.float32)
        for w, b in W[:-1]:
            h = np.maximum(h @ w.T + b, np.float32(0))
        s = h @ W[-1][0].T + W[-1][1]
        ref = interpret(prog, 1, memory=mem, pc=pc)
        mem, pc = ref.memory, ref.pc
        assert cp.layout.decode(s[0]) == (mem, pc)
