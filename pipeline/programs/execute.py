"""Run a compiled program: a PyTorch module that loops until halt or budget, and ONNX Runtime sessions of the
exported graphs. Both return ``(state (B, D), steps (B,) int64, halted (B,) bool)`` like the ONNX graphs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.programs.circuit import LayeredNet

__all__ = ["LoopedMLP", "OrtProgram"]


def _torch_module_class():
    import torch
    from torch import nn

    class _LoopedMLP(nn.Module):
        """The looped ReLU-MLP: ``h_l = ReLU(W_l h_{l-1} + b_l)``, ``state' = W_out h_L + b_out``, repeated.

        Weights are dense buffers (float32 by default; every value is a small integer, so fp32 is exact).
        """

        def __init__(self, net: LayeredNet, dtype: torch.dtype = torch.float32) -> None:
            super().__init__()
            self.depth = net.depth
            self.weight_dtype = dtype
            for k, (W, b) in enumerate(net.dense(np.float64)):
                self.register_buffer(f"W{k}", torch.as_tensor(W.T.copy(), dtype=dtype))  # (in, out) for h @ W
                self.register_buffer(f"b{k}", torch.as_tensor(b, dtype=dtype))

        def step(self, state: torch.Tensor) -> torch.Tensor:
            """One SUBLEQ step. ``state``: (B, D)."""
            h = state
            for k in range(self.depth):
                h = torch.relu(h @ getattr(self, f"W{k}") + getattr(self, f"b{k}"))
            return h @ getattr(self, f"W{self.depth}") + getattr(self, f"b{self.depth}")

        @torch.no_grad()
        def forward(self, state: torch.Tensor, max_steps: int):
            """Loop until every sample reached its fixed point or ``max_steps`` iterations ran.

            Returns ``(state (B, D), steps (B,) int64, halted (B,) bool)``.
            """
            s = state.to(self.weight_dtype)
            steps = torch.zeros(s.shape[0], dtype=torch.int64)
            for _ in range(int(max_steps)):
                nxt = self.step(s)
                changed = (nxt != s).any(dim=1)
                steps += changed.to(torch.int64)
                s = nxt
                if not bool(changed.any()):
                    break
            return s, steps, steps < int(max_steps)

    return _LoopedMLP


def LoopedMLP(net: LayeredNet, dtype=None):
    """A ``torch.nn.Module`` running ``net`` in a loop; see ``_LoopedMLP``."""
    import torch

    return _torch_module_class()(net, dtype or torch.float32)


class OrtProgram:
    """An ONNX Runtime session of an exported program (``.onnx`` or ``.ort``, Loop or unrolled)."""

    def __init__(
        self, path: Path, *, threads: int | None = 1, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        from runtimes.session import make_session

        self.path = Path(path)
        self.session = make_session(self.path, providers=providers, threads=threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.is_loop = "max_steps" in self.inputs

    def run(self, states: np.ndarray, max_steps: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feeds = {"state": np.ascontiguousarray(np.atleast_2d(states), dtype=np.float32)}
        if self.is_loop:
            if max_steps is None:
                raise ValueError("the Loop model needs max_steps")
            feeds["max_steps"] = np.array(int(max_steps), np.int64)
        s, n, h = self.session.run(["final_state", "steps", "halted"], feeds)
        return s, n, h
