"""Running a score network the way the pipeline needs it: inputs drawn from p_t, one score-function interface for
PyTorch and ONNX Runtime, and pruning of its linear layers.

A *score function* here is ``fn(x (n, d) float64, t (n,) float64) -> (n, d) float64`` (:data:`ScoreFn`), whatever
computes it (closed form, PyTorch in float32, an ONNX session in the target's precision).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.diffusion.gmm import GaussianMixture
from pipeline.diffusion.network import ScoreMLP
from pipeline.diffusion.samplers import ScoreFn

__all__ = ["feeds_of", "onnx_scorer", "prune_linears_", "score_inputs", "score_prune_methods", "torch_scorer"]

# Calibration statistics prune_linears_ collects for a linear layer (pipeline.pruning.registry.STATISTICS names).
_STATISTICS = frozenset({"sq_norms"})


def score_inputs(
    model: ScoreMLP, n: int, *, seed: int, mixture: GaussianMixture | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, d), t (n,)) float64 with OU time uniform on the network's [t_min, t_max] and x ~ p_t: from ``mixture``
    when given, else from N(0, (a_t² v + b_t²) I) with the recorded data second moment v."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    sch = c.schedule
    s_lo, s_hi = (sch.s(torch.tensor(v, dtype=torch.float64)) for v in (c.t_min, c.t_max))
    t = sch.t_of_s(s_lo + (s_hi - s_lo) * torch.rand(n, dtype=torch.float64, generator=g))
    if mixture is not None:
        return mixture.sample_t(t, generator=g, schedule=sch), t
    a, b = sch.alpha(t), sch.sigma(t)
    std = torch.sqrt(a * a * c.data_second_moment + b * b)
    return std[:, None] * torch.randn(n, c.dim, dtype=torch.float64, generator=g), t


def feeds_of(x: torch.Tensor, t: torch.Tensor) -> dict[str, np.ndarray]:
    """ONNX feeds ``{"x": (n, d), "t": (n,)}`` float32."""
    return {"x": x.to(torch.float32).numpy(), "t": t.to(torch.float32).numpy()}


def torch_scorer(model: nn.Module) -> ScoreFn:
    """The network as a float64 score function (computed in float32, no grad)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(torch.float32), t.to(torch.float32)).to(torch.float64)

    return fn


def onnx_scorer(session: Any) -> ScoreFn:
    """An ONNX Runtime session of an exported score network (inputs ``x``, ``t``; output ``score``) as a score function."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(["score"], feeds_of(x, t))
        return torch.from_numpy(np.asarray(out, dtype=np.float64))

    return fn


def score_prune_methods() -> list[str]:
    """The pruning methods a score network takes, read from the pruning registry: every method with a per-matrix
    rule that reads no calibration statistic beyond what :func:`prune_linears_` collects (the inputs' squared norms;
    not the Hessian of the reconstructing methods), sorted."""
    from pipeline.pruning.registry import matrix_methods, prune_method

    return [name for name in matrix_methods() if prune_method(name).needs <= _STATISTICS]


@torch.no_grad()
def prune_linears_(
    model: ScoreMLP,
    *,
    method: str,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Prune every ``nn.Linear`` of the network in place with the registered per-matrix rule of ``method`` (one of
    :func:`score_prune_methods`, e.g. ``magnitude``: |W| over each whole matrix; ``wanda``: |W|·‖X_j‖ per output
    row, input norms from ``calibration`` (x, t)); N:M when ``m`` > 0, else ``sparsity`` unstructured.

    Returns:
        ``{"sparsity": {layer: fraction of zero weights, ..., "overall": fraction}}``.

    Raises:
        ValueError: a method not in :func:`score_prune_methods`, or one that reads input norms without
            ``calibration``.
    """
    from pipeline.pruning.config import PruneConfig
    from pipeline.pruning.registry import MatrixInputs, prune_method

    allowed = score_prune_methods()
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed} for a score network, got {method!r}")
    spec = prune_method(method)
    rule = spec.prune_matrix
    assert rule is not None  # score_prune_methods() lists only methods with a per-matrix rule
    # N:M fixes the sparsity (1 - n/m), so it is not passed with it
    cfg = PruneConfig(method=method, pattern="n:m", n=n, m=m) if m else PruneConfig(method=method, sparsity=sparsity)
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    norms: dict[str, torch.Tensor] = {}
    if "sq_norms" in spec.needs:
        if calibration is None:
            raise ValueError(f"{method} needs calibration inputs")
        hooks = [
            mod.register_forward_hook(
                lambda mod, inp, out, name=name: norms.__setitem__(name, (inp[0].double() ** 2).sum(0))
            )
            for name, mod in linears
        ]
        try:
            model(calibration[0].to(torch.float32), calibration[1].to(torch.float32))
        finally:
            for h in hooks:
                h.remove()
    report: dict[str, float] = {}
    zeros = total = 0
    for name, mod in linears:
        w = mod.weight.data
        inputs = MatrixInputs(sq_norms=norms[name].to(w.dtype) if name in norms else None)  # (in,)
        new = rule(w, inputs, cfg)  # (out, in), zeros where pruned
        mod.weight.data.copy_(new)
        keep = new != 0
        report[name] = float(1 - keep.double().mean())
        zeros += int((~keep).sum())
        total += keep.numel()
    report["overall"] = zeros / max(total, 1)
    return {"sparsity": report}
