"""Assembler (one-line errors naming the line) and the reference interpreter (wraparound, halting, budget)."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError
from pipeline.programs.asm import AssemblyError, apply_memory, assemble, read_memory_file
from pipeline.programs.machine import MachineSpec, Program, interpret, wrap


def test_assembles_labels_defaults_and_padding():
    p = assemble(
        "start: subleq X, Y\n  subleq X, Y, start ; back\n  halt\nX: .word 3\nY: .word 5, -1\nB: .zero 2\n",
        source="t.sq",
    )
    assert p.spec == MachineSpec(8, 6, 4)  # X, Y, Y+1, B, B+1, __Z ; 3 instructions -> 4 slots
    z = p.data_labels["__Z"]
    assert p.code == ((0, 1, 1), (0, 1, 0), (z, z, 2), (z, z, 3))  # c omitted = next slot; padding = halt
    assert p.memory == (3, 5, -1, 0, 0, 0)


def test_label_offsets_and_numbers():
    p = assemble("subleq A+1, 0, 1\nsubleq A, A-0\nA: .word 1, 2\n")
    assert p.code[0] == (1, 0, 1) and p.code[1] == (0, 0, 0)


@pytest.mark.parametrize(
    "src, line, fragment",
    [
        ("subleq X, Y\nfoo X\nX: .word 1\nY: .word 2\n", 2, "unknown mnemonic 'foo'"),
        ("subleq X, Q\nX: .word 1\n", 1, "undefined label 'Q'"),
        ("subleq X\nX: .word 1\n", 1, "takes 2 or 3 operand(s)"),
        ("L: subleq X, X\nL: subleq X, X\nX: .word 1\n", 2, "already defined on line 1"),
        ("subleq X, X\nX: .word 300\n", 2, "does not fit a 8-bit"),
        ("subleq X, X\nX: .word abc\n", 2, "not an integer"),
        ("L: subleq X, X\nsubleq L, X\nX: .word 0\n", 2, "is a code label"),
        ("subleq X, X, X\nX: .word 0\n", 1, "is a data label"),
        ("subleq X, X\nX: .word 0\nDANGLING:\n", 3, "names nothing"),
        ("subleq X+5, X\nX: .word 0\n", 1, "outside the memory"),
        (".bits 40\nsubleq X, X\nX: .word 0\n", 1, "2..32 bits"),
        (".slots 3\nsubleq X, X\nX: .word 0\n", 1, "power of two"),
        ("subleq __Z, __Z\n", 1, "'__Z' is reserved"),
        ("__Z: subleq X, X\nX: .word 0\n", 1, "reserved"),
        ("X: .word 0\n", 1, "no instructions"),
        ("; expect Q = 3\nsubleq X, X\nX: .word 0\n", 1, "undefined data label 'Q'"),
    ],
)
def test_malformed_programs_name_the_line(src, line, fragment):
    with pytest.raises(AssemblyError) as ei:
        assemble(src, source="bad.sq")
    msg = str(ei.value)
    assert isinstance(ei.value, ConfigError) and "\n" not in msg
    assert msg.startswith(f"bad.sq:{line}: ") and fragment in msg, msg


def test_too_many_instructions_for_the_slots():
    with pytest.raises(AssemblyError, match=r"bad.sq:3: the program has 3 instructions but the machine has 2 slots"):
        assemble("subleq X, X\nsubleq X, X\nsubleq X, X\nX: .word 0\n", source="bad.sq", program_slots=2)


def test_memory_overrides_and_errors(tmp_path):
    p = assemble("subleq X, Y\nX: .word 1\nY: .word 2, 3\n; expect Y = 1\n")
    q = apply_memory(p, {"X": -4, "Y": [7, 8]})
    assert q.memory[:3] == (-4, 7, 8) and q.expect == {} and p.expect == {"Y": 1}
    with pytest.raises(AssemblyError, match="key 'W': not a data label"):
        apply_memory(p, {"W": 1}, source="m.json")
    with pytest.raises(AssemblyError, match="does not fit"):
        apply_memory(p, {"X": 1000})
    with pytest.raises(AssemblyError, match="zero cell"):
        apply_memory(p, {"Y": [1, 2, 3]})
    with pytest.raises(AssemblyError, match="run past the memory"):
        apply_memory(p, {"@2": [1, 2, 3]})
    bad = tmp_path / "m.json"
    bad.write_text('{"X": 1,\n oops}')
    with pytest.raises(AssemblyError, match=r"m.json:2: malformed JSON"):
        read_memory_file(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(AssemblyError, match="must be a JSON object"):
        read_memory_file(bad)


def test_wrap_is_twos_complement():
    assert [wrap(v, 4) for v in (7, 8, -8, -9, 15, 16)] == [7, -8, -8, 7, -1, 0]


def test_interpreter_overflow_wraps_and_branch_on_nonpositive():
    # (A, B, 1): B = B - A with B = -128, A = 1 -> wraps to 127 (> 0: no branch)
    spec = MachineSpec(8, 3, 2)
    p = Program(spec, ((0, 1, 1), (2, 2, 1)), (1, -128, 0))
    r = interpret(p, 10)
    assert r.memory == (1, 127, 0) and r.status == "halted" and r.steps == 1 and r.pc == 1


def test_halting_fixed_point_and_budget():
    p = assemble("loop: subleq ONE, X, done\njmp loop\ndone: halt\nX: .word 5\nONE: .word 1\n")
    r = interpret(p, 1000)
    assert r.status == "halted" and r.memory[0] == 0 and r.pc == 2
    again = interpret(p, 1000, memory=r.memory, pc=r.pc)
    assert again.steps == 0 and again.status == "halted" and again.memory == r.memory
    forever = assemble("loop: subleq M1, X\njmp loop\nX: .word 0\nM1: .word -1\n")
    r = interpret(forever, 300)
    assert r.status == "budget_exhausted" and r.steps == 300 and not r.halted


def test_machine_size_limits():
    with pytest.raises(AssemblyError, match=r"bad.sq:2: .zero takes one count in 1..4096"):
        assemble("subleq X, X\nX: .zero 100000000\n", source="bad.sq")
    with pytest.raises(AssemblyError, match=r"bad.sq:1: program slots must be a power of two in 2..4096"):
        assemble(".slots 8192\nsubleq X, X\nX: .word 0\n", source="bad.sq")
