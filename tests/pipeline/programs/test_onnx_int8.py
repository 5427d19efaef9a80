"""Exported graphs in ONNX Runtime (Loop and unrolled, fp32 and int8), the torch module, the int8 margin check
and sparse storage."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from pipeline.programs.asm import assemble
from pipeline.programs.build import parity
from pipeline.programs.compile import compile_program
from pipeline.programs.execute import LoopedMLP, OrtProgram
from pipeline.programs.machine import MachineSpec, interpret, random_program
from pipeline.programs.onnx_export import Int8MarginError, check_int8, export_onnx


def _memories(prog, rng, n):
    s = prog.spec
    return [prog.memory] + [
        tuple(int(v) for v in rng.integers(s.word_min, s.word_max + 1, size=s.memory_cells)) for _ in range(n)
    ]


@pytest.mark.parametrize(
    "nmi, construction, program_in",
    [
        ((8, 8, 8), "shallow", "weights"),
        ((5, 6, 4), "paper23", "state"),
        ((12, 5, 8), "paper23", "weights"),
        ((6, 3, 4), "shallow", "state"),
    ],
)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_loop_and_unrolled_bit_exact_in_ort(tmp_path, nmi, construction, program_in, precision):
    rng = np.random.default_rng(sum(nmi))
    prog = random_program(MachineSpec(*nmi), rng)
    cp = compile_program(prog, construction=construction, program_in=program_in)
    mems = _memories(prog, rng, 5)
    loop = export_onnx(cp, tmp_path / "loop.onnx", precision=precision)
    assert parity(prog, cp, OrtProgram(loop.path), mems, 40)["bit_exact"]
    un = export_onnx(cp, tmp_path / "unrolled.onnx", precision=precision, variant="unrolled", unroll_steps=12)
    assert parity(prog, cp, OrtProgram(un.path), mems, 12)["bit_exact"]
    ops = {n.op_type for n in onnx.load(str(loop.path)).graph.node}
    assert "Loop" in ops
    body = next(n for n in onnx.load(str(loop.path)).graph.node if n.op_type == "Loop").attribute[0].g
    body_ops = {n.op_type for n in body.node}
    assert ({"MatMul", "Relu"} if precision == "fp32" else {"MatMulInteger", "Relu"}) <= body_ops
    assert not any(n.domain not in ("", "ai.onnx") for n in body.node)  # no custom operator


def test_never_halting_program_stops_at_the_budget(tmp_path):
    prog = assemble("loop: subleq M1, X\njmp loop\nX: .word 0\nM1: .word -1\n")
    cp = compile_program(prog)
    ort_prog = OrtProgram(export_onnx(cp, tmp_path / "m.onnx").path)
    state, steps, halted = ort_prog.run(cp.layout.encode(prog)[None], 77)
    ref = interpret(prog, 77)
    assert ref.status == "budget_exhausted" and int(steps[0]) == 77 and not bool(halted[0])
    assert cp.layout.decode(state[0]) == (ref.memory, ref.pc)
    # the halting one in the same batch stops counting at its fixed point
    done = assemble("subleq ONE, X\nhalt\nX: .word 3\nONE: .word 1\n")
    cp2 = compile_program(done)
    _, steps2, halted2 = OrtProgram(export_onnx(cp2, tmp_path / "h.onnx").path).run(cp2.layout.encode(done)[None], 77)
    assert int(steps2[0]) == 1 and bool(halted2[0])


def test_torch_module_matches_interpreter():
    import torch

    rng = np.random.default_rng(3)
    prog = random_program(MachineSpec(7, 6, 8), rng)
    for construction in ("shallow", "paper23"):
        cp = compile_program(prog, construction=construction)
        mems = _memories(prog, rng, 3)
        s, n, h = LoopedMLP(cp.net)(torch.as_tensor(np.stack([cp.layout.encode(prog, m) for m in mems])), 30)
        for i, m in enumerate(mems):
            ref = interpret(prog, 30, memory=m)
            assert (
                cp.layout.decode(s[i].numpy()) == (ref.memory, ref.pc)
                and int(n[i]) == ref.steps
                and bool(h[i]) == ref.halted
            )


def _perturbed(cp, eps: float, seed: int = 0):
    """The same construction with every weight and bias moved by up to ``eps`` (uniform)."""
    rng = np.random.default_rng(seed)
    net = cp.net
    w = tuple((r, c, v + rng.uniform(-eps, eps, size=v.shape)) for r, c, v in net.weights)
    b = tuple(x + rng.uniform(-eps, eps, size=x.shape) for x in net.biases)
    ro = net.readout
    new = dataclasses.replace(
        net,
        weights=w,
        biases=b,
        readout=(ro[0], ro[1], ro[2] + rng.uniform(-eps, eps, size=ro[2].shape)),
        readout_bias=net.readout_bias + rng.uniform(-eps, eps, size=net.readout_bias.shape),
    )
    return dataclasses.replace(cp, net=new)


def test_int8_margin_is_measured_and_breaking_quantizations_are_refused(tmp_path):
    rng = np.random.default_rng(11)
    prog = random_program(MachineSpec(8, 6, 8), rng)
    cp = compile_program(prog)
    chk = check_int8(cp.net)
    assert chk.ok and chk.margin == 0.5 and chk.max_weight <= 2 and chk.max_activation == 1
    # small weight noise: fp32 is no longer exact, the int8 rounding recovers the integer network exactly
    noisy = _perturbed(cp, 0.01)
    c2 = check_int8(noisy.net)
    assert c2.ok and 0 < c2.margin < 0.5
    mems = _memories(prog, rng, 4)
    assert parity(prog, cp, OrtProgram(export_onnx(noisy, tmp_path / "q.onnx", precision="int8").path), mems, 30)[
        "bit_exact"
    ]
    assert not parity(prog, cp, OrtProgram(export_onnx(noisy, tmp_path / "f.onnx").path), mems, 30)["bit_exact"]
    # noise whose rounding can move a pre-activation by >= 0.5: refused, nothing written
    with pytest.raises(Int8MarginError, match="margin"):
        export_onnx(_perturbed(cp, 0.3), tmp_path / "bad.onnx", precision="int8")
    assert not (tmp_path / "bad.onnx").exists()
    # a weight outside int8 is refused too
    r, c, v = cp.net.weights[0]
    big = dataclasses.replace(cp, net=dataclasses.replace(cp.net, weights=((r, c, v * 200.0),) + cp.net.weights[1:]))
    with pytest.raises(Int8MarginError, match="exceeds int8"):
        export_onnx(big, tmp_path / "big.onnx", precision="int8")


def test_sparse_storage_shrinks_the_file_and_keeps_results(tmp_path):
    rng = np.random.default_rng(5)
    prog = random_program(MachineSpec(8, 16, 16), rng)
    cp = compile_program(prog)
    mems = _memories(prog, rng, 3)
    for precision in ("fp32", "int8"):
        sparse = export_onnx(cp, tmp_path / f"s_{precision}.onnx", precision=precision, sparse="auto")
        dense = export_onnx(cp, tmp_path / f"d_{precision}.onnx", precision=precision, sparse="never")
        assert sparse.sparse_matrices > 0 and dense.sparse_matrices == 0
        assert sparse.size_bytes < dense.size_bytes / 3
        for r in (sparse, dense):
            assert parity(prog, cp, OrtProgram(r.path), mems, 25)["bit_exact"]
    assert (
        export_onnx(cp, tmp_path / "i8.onnx", precision="int8", sparse="never").size_bytes
        < export_onnx(cp, tmp_path / "f.onnx", sparse="never").size_bytes / 3
    )
