"""Compile a SUBLEQ machine into looped ReLU-MLP weights (arXiv 2410.09375).

State vector (float, every entry a bit 0/1; bit t of a word has weight 2^t, t = 0 is the least significant)::

    [ mem[0][0..N-1], ..., mem[M-1][0..N-1] | pc[0..P-1] | (program_in="state") a[i][..A], b[i][..A], c[i][..P] for each slot i ]

with P = log2 I pc bits and A = ceil(log2 M) address bits. One loop iteration is one SUBLEQ step.

Two constructions, both verified against :func:`pipeline.programs.machine.interpret`:

- ``shallow``: every unit in the earliest layer its inputs allow. Depth 6 with the program in the weights,
  8 with the program in the state (the notes' 8-layer compile).
- ``paper23``: the paper's 23 layers in its order and budget: read addresses 2, read data 2, subtraction 7,
  write-back 2, next program counter 6, conditional branch 4. Each group starts after the previous one ends and
  hands its results on as units of its last layer. The paper's per-layer weights are not public; the primitives
  inside each group are ours, and layers a group does not need are pass-through layers.

Exact ReLU primitives (inputs are bits or small integers; arXiv 2410.09375):

- ``select(p, code) = ReLU(sum_t (code_t ? p_t : 1 - p_t) - A + 1)``; ``AND(e, v) = ReLU(e + v - 1)``.
- Two's-complement ``x - y = x + not(y) + 1`` with a carry-lookahead of small weights (never ``2^t`` weights, so
  every pre-activation is an integer of magnitude <= N + 2 and fp32 and int8 stay exact for N up to 32):
  ``g_t = ReLU(x_t - y_t)`` (generate), ``k_t = ReLU(y_t - x_t)``, ``p_t = 1 - g_t - k_t`` (propagate);
  the carry into bit t is the sum of the mutually exclusive terms ``AND(g_q, p_{q+1}, ..., p_{t-1})`` and
  ``AND(p_0, ..., p_{t-1})`` (the +1), and ``r_t = 1 + g_t - k_t + c_t - 2 c_{t+1}``.
- ``res <= 0``: ``flag = r_{N-1} + ReLU(1 - sum_t r_t)`` (the sign bit, or all bits zero).
- ``PC + 1``: carries ``AND(pc_0..pc_{t-1})``; branch ``pc'_t = ReLU(flag + c_t - 1) + ReLU(pc1_t - flag)``.
- write-back ``m'_{j,t} = ReLU(m_{j,t} - eB_j) + ReLU(r_t + eB_j - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from pipeline.programs.circuit import Circuit, LayeredNet, Lin, lsum
from pipeline.programs.machine import MachineSpec, Program

__all__ = [
    "CONSTRUCTIONS",
    "PAPER_BUDGET",
    "PROGRAM_IN",
    "CompiledProgram",
    "StateLayout",
    "compile_machine",
    "compile_program",
]

Construction = Literal["shallow", "paper23"]
ProgramIn = Literal["weights", "state"]
CONSTRUCTIONS: tuple[Construction, ...] = get_args(Construction)
PROGRAM_IN: tuple[ProgramIn, ...] = get_args(ProgramIn)
# the paper's layer budget per step, in order (arXiv 2410.09375 [C])
PAPER_BUDGET = (
    ("read_addresses", 2),
    ("read_data", 2),
    ("subtraction", 7),
    ("write_back", 2),
    ("next_pc", 6),
    ("branch", 4),
)


@dataclass(frozen=True)
class StateLayout:
    """Where each field lives in the state vector (offsets into it)."""

    spec: MachineSpec
    program_in: str

    @property
    def mem_offset(self) -> int:
        return 0

    @property
    def pc_offset(self) -> int:
        return self.spec.memory_cells * self.spec.word_bits

    @property
    def inst_offset(self) -> int:
        return self.pc_offset + self.spec.pc_bits

    @property
    def inst_width(self) -> int:
        s = self.spec
        return 2 * s.addr_bits + s.pc_bits

    @property
    def size(self) -> int:
        extra = self.spec.program_slots * self.inst_width if self.program_in == "state" else 0
        return self.inst_offset + extra

    def mem_bit(self, cell: int, t: int) -> int:
        return cell * self.spec.word_bits + t

    def encode(self, program: Program, memory: Sequence[int] | None = None, pc: int = 0) -> np.ndarray:
        """The state vector (float32, (D,)) of ``program`` with ``memory`` (default: its own) and ``pc``."""
        s = self.spec
        x = np.zeros(self.size, np.float32)
        mem = program.memory if memory is None else memory
        for j, v in enumerate(mem):
            u = int(v) % (1 << s.word_bits)
            for t in range(s.word_bits):
                x[self.mem_bit(j, t)] = (u >> t) & 1
        for t in range(s.pc_bits):
            x[self.pc_offset + t] = (pc >> t) & 1
        if self.program_in == "state":
            A, P = s.addr_bits, s.pc_bits
            for i, (a, b, c) in enumerate(program.code):
                base = self.inst_offset + i * self.inst_width
                for t in range(A):
                    x[base + t] = (a >> t) & 1
                    x[base + A + t] = (b >> t) & 1
                for t in range(P):
                    x[base + 2 * A + t] = (c >> t) & 1
        return x

    def decode(self, state: np.ndarray) -> tuple[tuple[int, ...], int]:
        """(memory as signed ints, pc) from one state vector. Raises ValueError if an entry is not a bit."""
        s = self.spec
        x = np.asarray(state, dtype=np.float64)
        bits = np.rint(x).astype(np.int64)
        if not np.array_equal(bits.astype(np.float64), x) or ((bits != 0) & (bits != 1)).any():
            raise ValueError("state has entries that are not exactly 0 or 1")
        weights = 1 << np.arange(s.word_bits, dtype=np.int64)
        mem = bits[: self.pc_offset].reshape(s.memory_cells, s.word_bits) @ weights
        signed = tuple(int(v) - (1 << s.word_bits) if v >= (1 << (s.word_bits - 1)) else int(v) for v in mem)
        pc = int(bits[self.pc_offset : self.inst_offset] @ (1 << np.arange(s.pc_bits, dtype=np.int64)))
        return signed, pc


@dataclass(frozen=True)
class CompiledProgram:
    """Weights plus what is needed to use them: the layout, and the program when it is baked into the weights."""

    net: LayeredNet
    layout: StateLayout
    construction: str
    program: Program | None  # set when program_in == "weights"

    @property
    def spec(self) -> MachineSpec:
        return self.layout.spec

    def stats(self) -> dict[str, object]:
        return {
            "construction": self.construction,
            "program_in": self.layout.program_in,
            "state_size": self.layout.size,
            **self.net.stats(),
        }


class _Placer:
    """Where units go: ASAP (shallow), or inside the paper's layer groups (paper23)."""

    def __init__(self, circuit: Circuit, construction: str) -> None:
        self.c = circuit
        self.groups: dict[str, tuple[int, int]] = {}
        if construction == "paper23":
            start = 1
            for name, n in PAPER_BUDGET:
                self.groups[name] = (start, start + n - 1)
                start += n

    def unit(self, lin: Lin, group: str) -> Lin:
        if not self.groups:
            return self.c.relu(lin)
        lo, hi = self.groups[group]
        at = max(lin.layer + 1, lo)
        if at > hi:
            raise AssertionError(f"group '{group}' (layers {lo}..{hi}) cannot place a unit reading layer {lin.layer}")
        return self.c.relu(lin, at=at)

    def out(self, lin: Lin, group: str) -> Lin:
        """Hand a group's result on as a unit of the group's last layer (paper23); unchanged for shallow."""
        if not self.groups:
            return lin
        hi = self.groups[group][1]
        if lin.layer > hi:
            raise AssertionError(f"group '{group}' result reads layer {lin.layer} > {hi}")
        return lin if lin.layer == hi else self.c.relu(lin, at=hi)


def _bits_of(v: int, n: int) -> list[int]:
    return [(v >> t) & 1 for t in range(n)]


def _select(vec: Sequence[Lin], code: int) -> Lin:
    """Pre-activation of select(vec == code): the count of matching bits minus (len - 1)."""
    return lsum(x if bit else 1 - x for x, bit in zip(vec, _bits_of(code, len(vec)))) - (len(vec) - 1)


def compile_machine(
    spec: MachineSpec, *, construction: str = "shallow", program: Program | None = None
) -> CompiledProgram:
    """Weights of one SUBLEQ step for machine ``spec``.

    Args:
        spec: sizes (N, M, I).
        construction: ``shallow`` or ``paper23``.
        program: bake this program's code into the weights (``program_in="weights"``: the state holds memory
            and PC only). ``None``: the code lives in the state (``program_in="state"``), so one network runs
            any program of this size.

    Raises:
        ValueError: unknown construction, or a program of another machine size.
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {CONSTRUCTIONS}, got {construction!r}")
    if program is not None and program.spec != spec:
        raise ValueError(f"program is for {program.spec}, not {spec}")
    layout = StateLayout(spec, "weights" if program is not None else "state")
    N, M, I, A, P = spec.word_bits, spec.memory_cells, spec.program_slots, spec.addr_bits, spec.pc_bits
    c = Circuit(layout.size)
    pl = _Placer(c, construction)
    mem = [[c.input(layout.mem_bit(j, t)) for t in range(N)] for j in range(M)]
    pc = [c.input(layout.pc_offset + t) for t in range(P)]

    # -- read addresses: one-hot instruction slot, then its fields a, b, c
    eI = [pl.unit(_select(pc, i), "read_addresses") for i in range(I)]
    if program is not None:
        # the code is constant: one-hot addresses and the jump target are sums of the slot selectors
        eA = [lsum(eI[i] for i, (a, _, _) in enumerate(program.code) if a == m) for m in range(M)]
        eB = [lsum(eI[i] for i, (_, b, _) in enumerate(program.code) if b == m) for m in range(M)]
        cbits = [lsum(eI[i] for i, (_, _, cc) in enumerate(program.code) if (cc >> t) & 1) for t in range(P)]
        eA = [pl.out(e, "read_addresses") for e in eA]
        eB = [pl.out(e, "read_addresses") for e in eB]
    else:
        field = lambda i, off: c.input(layout.inst_offset + i * layout.inst_width + off)  # noqa: E731
        abits = [lsum(pl.unit(eI[i] + field(i, t) - 1, "read_addresses") for i in range(I)) for t in range(A)]
        bbits = [lsum(pl.unit(eI[i] + field(i, A + t) - 1, "read_addresses") for i in range(I)) for t in range(A)]
        cbits = [lsum(pl.unit(eI[i] + field(i, 2 * A + t) - 1, "read_addresses") for i in range(I)) for t in range(P)]
        abits = [pl.out(x, "read_addresses") for x in abits]
        bbits = [pl.out(x, "read_addresses") for x in bbits]
        eA = [pl.unit(_select(abits, m), "read_data") for m in range(M)]
        eB = [pl.unit(_select(bbits, m), "read_data") for m in range(M)]
    cbits = [pl.out(x, "read_addresses") for x in cbits]

    # -- read data: x = mem[b], y = mem[a]
    x = [pl.out(lsum(pl.unit(mem[m][t] + eB[m] - 1, "read_data") for m in range(M)), "read_data") for t in range(N)]
    y = [pl.out(lsum(pl.unit(mem[m][t] + eA[m] - 1, "read_data") for m in range(M)), "read_data") for t in range(N)]

    # -- subtraction r = x - y (two's complement, carry-lookahead with weights in {-2..2})
    g = [pl.unit(x[t] - y[t], "subtraction") for t in range(N)]
    k = [pl.unit(y[t] - x[t], "subtraction") for t in range(N)]
    p = [1 - g[t] - k[t] for t in range(N)]
    carry: list[Lin] = [Lin(const=1.0)]
    for t in range(1, N + 1):
        terms = [pl.unit(lsum(p[:t]) - (t - 1), "subtraction")]  # the +1 carried through p_0..p_{t-1}
        terms += [pl.unit(g[q] + lsum(p[q + 1 : t]) - (t - q - 1), "subtraction") for q in range(t)]
        carry.append(lsum(terms))
    r = [pl.out(1 + g[t] - k[t] + carry[t] - 2 * carry[t + 1], "subtraction") for t in range(N)]

    # -- write-back into mem[b]
    new_mem = [
        [
            pl.out(pl.unit(mem[m][t] - eB[m], "write_back") + pl.unit(r[t] + eB[m] - 1, "write_back"), "write_back")
            for t in range(N)
        ]
        for m in range(M)
    ]

    # -- next program counter: pc + 1 mod I
    inc = [Lin(const=1.0)] + [pl.unit(lsum(pc[:t]) - (t - 1), "next_pc") if t > 1 else pc[0] for t in range(1, P + 1)]
    pc1 = [pl.out(pc[t] + inc[t] - 2 * inc[t + 1], "next_pc") for t in range(P)]

    # -- conditional branch: res <= 0 -> c, else pc + 1
    z = pl.unit(1 - lsum(r), "branch")
    flag = r[N - 1] + z
    if pl.groups:
        flag = pl.unit(flag, "branch")
    new_pc = [
        pl.out(pl.unit(flag + cbits[t] - 1, "branch") + pl.unit(pc1[t] - flag, "branch"), "branch") for t in range(P)
    ]

    outputs: list[Lin] = [b for row in new_mem for b in row] + new_pc
    if program is None:
        outputs += [c.input(layout.inst_offset + j) for j in range(I * layout.inst_width)]
    net = c.net(outputs, depth=sum(n for _, n in PAPER_BUDGET) if pl.groups else None)
    return CompiledProgram(net, layout, construction, program)


def compile_program(program: Program, *, construction: str = "shallow", program_in: str = "weights") -> CompiledProgram:
    """:func:`compile_machine` for ``program``'s machine, the code in the weights (default) or in the state."""
    if program_in not in PROGRAM_IN:
        raise ValueError(f"program_in must be one of {PROGRAM_IN}, got {program_in!r}")
    return compile_machine(
        program.spec, construction=construction, program=program if program_in == "weights" else None
    )
