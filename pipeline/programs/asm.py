"""A small SUBLEQ assembly language and the memory-file reader.

Syntax (one statement per line; ``;`` or ``#`` starts a comment)::

    .bits 8                   ; word size N (default 8); .cells M and .slots I set the machine sizes
    loop:   subleq X, Z       ; subleq a, b [, c]  (c omitted = the next slot)
            subleq Z, P, loop
            jmp done          ; = subleq __Z, __Z, done  (an unconditional jump through a zero cell)
    done:   halt              ; = subleq __Z, __Z, <this slot>: the halting fixed point
    X:      .word 7           ; one cell (or several: .word 3, -1, 4)
    BUF:    .zero 4           ; four cells holding 0
    ; expect P = 35           ; an expected result (checked by the CLI and the tests)

Operands are a label, ``label+k`` / ``label-k``, or a number. ``a`` and ``b`` name memory cells (data labels),
``c`` names an instruction slot (code label). Code and data are separate address spaces. ``halt``, ``jmp`` and
padded slots use a zero cell ``__Z`` the assembler adds; labels starting with ``__`` are reserved.
Unused slots up to I are filled with ``halt``, so running off the end of the code halts.

Every problem raises :class:`AssemblyError`: one line ``FILE:LINE: cause``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.programs.machine import MachineSpec, Program

__all__ = ["AssemblyError", "apply_memory", "assemble", "assemble_file", "read_memory_file"]

_LABEL = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OPERAND = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)?\s*(?:([+-])\s*(\d+))?$")
_EXPECT = re.compile(r"^[;#]\s*expect\s+([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?\s*=\s*(-?\d+)\s*$")
ZERO = "__Z"
MAX_CELLS = 4096  # a larger machine would not fit any target's memory as a dense network anyway
MAX_SLOTS = 4096


class AssemblyError(ConfigError):
    """A malformed program or memory file: ``FILE:LINE: cause`` (exit code 2 on the command line)."""


def _int(tok: str) -> int | None:
    try:
        return int(tok, 0)
    except ValueError:
        return None


def assemble(
    text: str,
    *,
    source: str = "<program>",
    word_bits: int | None = None,
    memory_cells: int | None = None,
    program_slots: int | None = None,
) -> Program:
    """Assemble SUBLEQ source into a :class:`Program` (code table of I slots, memory of M cells).

    Args:
        text: the source.
        source: file name used in error messages.
        word_bits / memory_cells / program_slots: override ``.bits`` / ``.cells`` / ``.slots``; M defaults to
            the cells the program declares, I to the next power of two that holds the code.

    Raises:
        AssemblyError: naming the line and the cause (unknown mnemonic, undefined or duplicate label, a value
            that does not fit the word, an operand of the wrong kind, a program larger than the machine).
    """
    directives: dict[str, tuple[int, int]] = {}
    code: list[tuple[int, str, list[str]]] = []  # (line, mnemonic, operands)
    data: list[tuple[int, int]] = []  # (line, value) per cell
    code_labels: dict[str, int] = {}
    data_labels: dict[str, int] = {}
    label_line: dict[str, int] = {}
    expect: dict[str, tuple[int, str, int, int]] = {}
    pending: list[tuple[str, int]] = []  # labels waiting for the next statement

    def err(line: int, msg: str) -> AssemblyError:
        return AssemblyError(f"{source}:{line}: {msg}")

    for ln, raw in enumerate(text.splitlines(), 1):
        m = _EXPECT.match(raw.strip())
        if m:
            key = f"{m.group(1)}[{m.group(2)}]" if m.group(2) else m.group(1)
            expect[key] = (ln, m.group(1), int(m.group(2) or 0), int(m.group(3)))
            continue
        line = re.split(r"[;#]", raw, maxsplit=1)[0].strip()
        while line:
            lm = _LABEL.match(line)
            if not lm:
                break
            name = lm.group(1)
            if name.startswith("__"):
                raise err(ln, f"label '{name}' is reserved (names starting with '__' belong to the assembler)")
            if name in label_line:
                raise err(ln, f"label '{name}' already defined on line {label_line[name]}")
            label_line[name] = ln
            pending.append((name, ln))
            line = lm.group(2).strip()
        if not line:
            continue
        parts = line.split(None, 1)
        op = parts[0].lower()
        args = [a.strip() for a in parts[1].split(",")] if len(parts) > 1 and parts[1].strip() else []
        if op in (".bits", ".cells", ".slots"):
            if pending:
                raise err(ln, f"a label cannot name the directive {op}")
            value = _int(args[0]) if len(args) == 1 else None
            if value is None:
                raise err(ln, f"{op} takes one integer, got {', '.join(args) or 'nothing'}")
            directives[op] = (ln, value)
            continue
        if op in (".word", ".zero"):
            if not args:
                raise err(ln, f"{op} needs a value")
            if op == ".zero":
                n = _int(args[0]) if len(args) == 1 else None
                if n is None or not 1 <= n <= MAX_CELLS:
                    raise err(ln, f".zero takes one count in 1..{MAX_CELLS}, got {', '.join(args)}")
                values = [0] * n
            else:
                values = []
                for a in args:
                    v = _int(a)
                    if v is None:
                        raise err(ln, f".word value '{a}' is not an integer")
                    values.append(v)
            for name, _ in pending:
                data_labels[name] = len(data)
            pending.clear()
            data.extend((ln, v) for v in values)
            continue
        if op not in ("subleq", "jmp", "halt"):
            raise err(
                ln, f"unknown mnemonic '{parts[0]}' (expected subleq, jmp, halt, .word, .zero, .bits, .cells, .slots)"
            )
        want = {"subleq": (2, 3), "jmp": (1, 1), "halt": (0, 0)}[op]
        if not want[0] <= len(args) <= want[1] or any(not a for a in args):
            raise err(
                ln,
                f"{op} takes {want[0] if want[0] == want[1] else f'{want[0]} or {want[1]}'} operand(s), got {len(args)}: '{line}'",
            )
        for name, _ in pending:
            code_labels[name] = len(code)
        pending.clear()
        code.append((ln, op, args))
    if pending:
        name, ln = pending[-1]
        raise err(ln, f"label '{name}' names nothing (no instruction or data follows)")
    if not code:
        raise AssemblyError(f"{source}:1: the program has no instructions")

    bits = word_bits or directives.get(".bits", (0, 8))[1]
    if not 2 <= bits <= 32:
        raise err(directives.get(".bits", (1, 0))[0], f"word size must be 2..32 bits, got {bits}")
    spec_n = MachineSpec(bits, 1, 2)
    for ln, v in data:
        if not spec_n.word_min <= v <= spec_n.word_max:
            raise err(
                ln, f"value {v} does not fit a {bits}-bit two's-complement word [{spec_n.word_min}, {spec_n.word_max}]"
            )

    slots = program_slots or directives.get(".slots", (0, 0))[1] or max(2, 1 << (len(code) - 1).bit_length())
    if slots < 2 or slots & (slots - 1) or slots > MAX_SLOTS:
        raise err(
            directives.get(".slots", (1, 0))[0], f"program slots must be a power of two in 2..{MAX_SLOTS}, got {slots}"
        )
    if len(code) > slots:
        raise err(code[slots][0], f"the program has {len(code)} instructions but the machine has {slots} slots")
    uses_zero = len(code) < slots or any(op in ("jmp", "halt") for _, op, _ in code)
    if uses_zero:
        data_labels[ZERO] = len(data)
        data.append((0, 0))
    cells = memory_cells or directives.get(".cells", (0, 0))[1] or len(data)
    if cells > MAX_CELLS:
        where = directives[".cells"][0] if ".cells" in directives else (data[-1][0] or 1 if data else 1)
        raise err(where, f"the machine would have {cells} memory cells; at most {MAX_CELLS} are supported")
    if cells < len(data):
        raise err(
            directives.get(".cells", (1, 0))[0],
            f"the program declares {len(data)} memory cells but the machine has {cells}",
        )
    spec = MachineSpec(bits, cells, slots)

    def operand(tok: str, ln: int, kind: str) -> int:
        v = _int(tok)
        if v is None:
            om = _OPERAND.match(tok.replace(" ", ""))
            if not om or not om.group(1):
                raise err(ln, f"operand '{tok}' is not a label, label+k or a number")
            name, sign, off = om.group(1), om.group(2), int(om.group(3) or 0)
            if name.startswith("__"):
                raise err(
                    ln, f"operand '{tok}': '{name}' is reserved (names starting with '__' belong to the assembler)"
                )
            table, other = (data_labels, code_labels) if kind == "data" else (code_labels, data_labels)
            if name not in table:
                if name in other:
                    what = "a code label" if kind == "data" else "a data label"
                    raise err(
                        ln,
                        f"operand '{tok}': '{name}' is {what}; {'a and b address memory cells' if kind == 'data' else 'c is an instruction slot'}",
                    )
                raise err(ln, f"operand '{tok}': undefined label '{name}'")
            v = table[name] + (-off if sign == "-" else off)
        limit = cells if kind == "data" else slots
        if not 0 <= v < limit:
            raise err(
                ln, f"operand '{tok}' = {v} is outside the {'memory' if kind == 'data' else 'program'} (0..{limit - 1})"
            )
        return v

    table: list[tuple[int, int, int]] = []
    for j, (ln, op, args) in enumerate(code):
        if op == "halt":
            z = data_labels[ZERO]
            table.append((z, z, j))
        elif op == "jmp":
            z = data_labels[ZERO]
            table.append((z, z, operand(args[0], ln, "code")))
        else:
            a, b = operand(args[0], ln, "data"), operand(args[1], ln, "data")
            c = operand(args[2], ln, "code") if len(args) == 3 else (j + 1) % slots
            table.append((a, b, c))
    for j in range(len(code), slots):
        z = data_labels[ZERO]
        table.append((z, z, j))
    memory = [v for _, v in data] + [0] * (cells - len(data))
    exp: dict[str, int] = {}
    for key, (ln, name, _k, v) in expect.items():
        if name not in data_labels:
            raise err(ln, f"expect: undefined data label '{name}'")
        exp[key] = v
    return Program(spec, tuple(table), tuple(memory), dict(data_labels), dict(code_labels), source, exp)


def assemble_file(path: str | Path, **sizes: Any) -> Program:
    """:func:`assemble` a ``.sq`` file (UTF-8)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AssemblyError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AssemblyError(f"{p}: cannot read: {exc}") from None
    return assemble(text, source=str(p), **sizes)


def apply_memory(program: Program, values: Mapping[str, Any], *, source: str = "<memory>") -> Program:
    """Program with initial cells replaced: ``{label: int | [int, ...]}`` (a list fills cells from the label on),
    or ``{"@k": int}`` for cell k by address. The program's expectations are dropped (they describe its own memory)."""
    mem = list(program.memory)
    spec = program.spec
    reserved = {v for k, v in program.data_labels.items() if k.startswith("__")}
    for key, val in values.items():
        if isinstance(key, str) and key.startswith("@") and key[1:].isdigit():
            start = int(key[1:])
        elif key in program.data_labels and not key.startswith("__"):
            start = program.data_labels[key]
        else:
            known = ", ".join(sorted(k for k in program.data_labels if not k.startswith("__")))
            raise AssemblyError(
                f"{source}: key '{key}': not a data label of {program.source} (labels: {known}) nor '@address'"
            )
        vals = val if isinstance(val, list) else [val]
        if start + len(vals) > spec.memory_cells:
            raise AssemblyError(
                f"{source}: key '{key}': {len(vals)} value(s) from cell {start} run past the memory ({spec.memory_cells} cells)"
            )
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, int):
                raise AssemblyError(f"{source}: key '{key}': values must be integers, got {v!r}")
            if start + i in reserved:
                raise AssemblyError(
                    f"{source}: key '{key}': cell {start + i} is the assembler's zero cell (halt and jmp need it to stay 0)"
                )
            if not spec.word_min <= v <= spec.word_max:
                raise AssemblyError(
                    f"{source}: key '{key}': {v} does not fit a {spec.word_bits}-bit two's-complement word"
                )
            mem[start + i] = v
    # the file's "; expect" lines describe its own memory, not this one
    return Program(program.spec, program.code, tuple(mem), program.data_labels, program.code_labels, program.source, {})


def read_memory_file(path: str | Path) -> dict[str, Any]:
    """Read a memory file: a JSON object ``{label: int | [int, ...], "@address": int}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AssemblyError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AssemblyError(f"{p}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise AssemblyError(f"{p}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise AssemblyError(f"{p}: a memory file must be a JSON object {{label: value}}, got {type(data).__name__}")
    return data
