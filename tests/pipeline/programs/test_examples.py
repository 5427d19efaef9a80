"""The example library: each program against Python arithmetic (interpreter, many memories) and its compiled
ONNX graphs (fp32 and int8) against the interpreter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.programs.asm import apply_memory, assemble_file
from pipeline.programs.build import parity
from pipeline.programs.compile import compile_program
from pipeline.programs.execute import OrtProgram
from pipeline.programs.machine import interpret, wrap
from pipeline.programs.onnx_export import export_onnx

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "programs"


def _fib(k: int) -> int:
    a, b = 0, 1
    for _ in range(k):
        a, b = b, a + b
    return a


def _cases(name: str, rng: np.random.Generator):
    """(memory overrides, expected cells) pairs computed with Python arithmetic."""
    for _ in range(12):
        if name == "multiply":
            x, y = int(rng.integers(-40, 41)), int(rng.integers(0, 12))
            yield {"X": x, "Y": y, "P": 0}, {"P": wrap(x * y, 8)}  # wraps like the 8-bit machine
        elif name == "divide":
            x, y = int(rng.integers(0, 128)), int(rng.integers(1, 30))
            yield {"X": x, "Y": y, "Q": 0, "R": 0}, {"Q": x // y, "R": x % y}
        elif name == "fibonacci":
            k = int(rng.integers(0, 30))
            yield {"K": k, "A": 0, "B": 1}, {"A": wrap(_fib(k), 16)}
        elif name == "argmax":
            arr = [int(v) for v in rng.integers(-60, 61, size=8)]
            yield {"ARR": arr}, {"IDX": int(np.argmax(arr)), "MAXV": max(arr)}
        elif name == "bubble_sort":
            arr = [int(v) for v in rng.integers(-60, 61, size=8)]
            yield {"ARR": arr}, {f"ARR[{k}]": v for k, v in enumerate(sorted(arr))}


def _cell(prog, key: str) -> int:
    label, _, idx = key.partition("[")
    return prog.data_labels[label] + (int(idx[:-1]) if idx else 0)


NAMES = ["multiply", "divide", "fibonacci", "argmax", "bubble_sort"]


def test_library_is_complete():
    assert sorted(p.stem for p in EXAMPLES.glob("*.sq")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_against_python_arithmetic(name):
    prog = assemble_file(EXAMPLES / f"{name}.sq")
    assert prog.expect, f"{name}.sq states no expected result"
    ref = interpret(prog, 100_000)
    assert ref.halted and all(ref.memory[_cell(prog, k)] == v for k, v in prog.expect.items())
    rng = np.random.default_rng(len(name))
    for mem, expected in _cases(name, rng):
        run = interpret(apply_memory(prog, mem), 100_000)
        assert run.halted, (name, mem)
        got = {k: run.memory[_cell(prog, k)] for k in expected}
        assert got == expected, (name, mem)


@pytest.mark.parametrize("name", NAMES)
def test_example_compiled_bit_exact(tmp_path, name):
    prog = assemble_file(EXAMPLES / f"{name}.sq")
    rng = np.random.default_rng(1)
    mems = [prog.memory] + [apply_memory(prog, m).memory for m, _ in list(_cases(name, rng))[:3]]
    cp = compile_program(prog)
    for precision in ("fp32", "int8"):
        r = export_onnx(cp, tmp_path / f"{precision}.onnx", precision=precision)
        assert parity(prog, cp, OrtProgram(r.path), mems, 2000)["bit_exact"], (name, precision)
