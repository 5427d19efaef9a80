"""The time-conditioned score network and its on-disk form (a local folder: ``config.json`` + ``model.safetensors``).

:class:`ScoreMLP` maps (x (B, d), t (B,)) to ŝ(x, t) (B, d). Inside, an MLP predicts the noise ε̂ from the
preconditioned input ``x / sqrt(a_t² v + b_t²)`` (v: the data's per-coordinate second moment) and sinusoidal features
of log t, and returns ``ŝ = −ε̂ / b_t`` — the standard ε-parametrisation (DDPM), computed inside the graph so the ONNX
export outputs the score itself.

Folder layout (no code, no pickles; :func:`load_score_model` refuses anything else)::

    config.json         {"model_type": "edgepipe-score-mlp", "dim", "hidden", "layers", "time_features",
                         "schedule": {...}, "t_min", "t_max", "data_second_moment",
                         "data_distribution": {"type": "gaussian-mixture", "weights", "means", "covs"} (optional),
                         "training": {...} (the recipe, for the record)}
    model.safetensors   float32 tensors of the MLP (``net.<i>.weight`` / ``.bias``)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.diffusion.gmm import GaussianMixture, Schedule

__all__ = [
    "FAMILY",
    "MODEL_TYPE",
    "TASK",
    "ScoreMLP",
    "ScoreModelConfig",
    "ScoreModelError",
    "export_score_onnx",
    "load_score_model",
    "mixture_of",
    "read_config",
    "save_score_model",
]

MODEL_TYPE = "edgepipe-score-mlp"  # config.json "model_type"
TASK = "score-model"
FAMILY = "score-model"


class ScoreModelError(ValueError):
    """A score-model folder or config is invalid; one line naming the file and key."""


class ScoreModelConfig:
    """Architecture + time range of a :class:`ScoreMLP`, read from / written to ``config.json``.

    Args:
        dim: data dimension d.
        hidden: width of each hidden layer.
        layers: number of hidden layers (≥ 1).
        time_features: sinusoidal features of log t (even).
        schedule: the forward schedule the score belongs to.
        t_min, t_max: time range the network was trained on (δ and T of the samplers).
        data_second_moment: v = E‖x_0‖² / d, for input preconditioning.
        extra: other config keys kept verbatim (``data_distribution``, ``training``).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        layers: int = 3,
        time_features: int = 16,
        schedule: Schedule | None = None,
        t_min: float = 1e-3,
        t_max: float = 8.0,
        data_second_moment: float = 1.0,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.dim, self.hidden, self.layers, self.time_features = int(dim), int(hidden), int(layers), int(time_features)
        self.schedule = schedule or Schedule()
        self.t_min, self.t_max, self.data_second_moment = float(t_min), float(t_max), float(data_second_moment)
        self.extra = dict(extra or {})
        problems = []
        if not (1 <= self.dim <= 4096 and 1 <= self.hidden <= 65536 and 1 <= self.layers <= 64):
            problems.append("need 1 <= dim <= 4096, 1 <= hidden <= 65536, 1 <= layers <= 64")
        if self.time_features < 2 or self.time_features % 2:
            problems.append("time_features must be an even number >= 2")
        if not 0 < self.t_min < self.t_max or not all(map(math.isfinite, (self.t_min, self.t_max))):
            problems.append("need 0 < t_min < t_max")
        if not (self.data_second_moment > 0 and math.isfinite(self.data_second_moment)):
            problems.append("data_second_moment must be a positive number")
        if problems:
            raise ScoreModelError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["ScoreMLP"],
            "task": TASK,
            "dim": self.dim,
            "hidden": self.hidden,
            "layers": self.layers,
            "time_features": self.time_features,
            "schedule": self.schedule.to_dict(),
            "t_min": self.t_min,
            "t_max": self.t_max,
            "data_second_moment": self.data_second_moment,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreModelConfig:
        known = {"dim", "hidden", "layers", "time_features", "t_min", "t_max", "data_second_moment"}
        extra = {k: v for k, v in data.items() if k not in known | {"model_type", "architectures", "task", "schedule"}}
        if not isinstance(data.get("schedule", {}), Mapping):
            raise ScoreModelError("schedule must be a mapping {kind, beta_min, beta_max}")
        try:
            sched = Schedule.from_dict(data.get("schedule") or {})
            return cls(**{k: data[k] for k in known if k in data}, schedule=sched, extra=extra)
        except (TypeError, KeyError) as exc:
            raise ScoreModelError(f"bad value: {exc}") from None
        except ScoreModelError:
            raise
        except ValueError as exc:  # schedule
            raise ScoreModelError(str(exc)) from None


class ScoreMLP(nn.Module):
    """ŝ_θ(x, t): an MLP on [x / sqrt(a_t² v + b_t²), sin/cos(ω log t)] predicting ε̂, returning −ε̂ / b_t.

    Shapes: x (B, d) float32, t (B,) float32 in [t_min, t_max] → (B, d).
    """

    freqs: torch.Tensor  # (F/2,) buffer: log-spaced time frequencies

    def __init__(self, config: ScoreModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        freqs = torch.exp(torch.linspace(math.log(0.05), math.log(2.0), c.time_features // 2))
        self.register_buffer("freqs", freqs, persistent=False)  # (F/2,)
        dims = [c.dim + c.time_features] + [c.hidden] * c.layers
        mods: list[nn.Module] = []
        for i in range(c.layers):
            mods += [nn.Linear(dims[i], dims[i + 1]), nn.SiLU()]
        mods.append(nn.Linear(c.hidden, c.dim))
        self.net = nn.Sequential(*mods)

    def _scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.config.schedule.s(t)  # (B,) OU time
        a2 = torch.exp(-2 * s)
        sigma = torch.sqrt(1 - a2)  # (B,) b_t
        c_in = torch.rsqrt(a2 * self.config.data_second_moment + 1 - a2)  # (B,) 1 / std of x_t
        return sigma, c_in

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε̂(x, t), (B, d)."""
        _, c_in = self._scales(t)
        u = torch.log(t)[:, None] * self.freqs[None]  # (B, F/2)
        h = torch.cat([x * c_in[:, None], torch.sin(u), torch.cos(u)], dim=1)  # (B, d + F)
        return self.net(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma, _ = self._scales(t)
        return -self.eps(x, t) / sigma[:, None]


def mixture_of(config: ScoreModelConfig) -> GaussianMixture | None:
    """The ``data_distribution`` the network was trained on, if its config records one."""
    spec = config.extra.get("data_distribution")
    if not spec:
        return None
    if spec.get("type", "gaussian-mixture") != "gaussian-mixture":
        raise ScoreModelError(f"data_distribution.type must be 'gaussian-mixture', got {spec.get('type')!r}")
    try:
        return GaussianMixture.from_dict(spec)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ScoreModelError(f"data_distribution: {exc}") from None


def save_score_model(model: ScoreMLP, out_dir: Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir`` (created), each atomically."""
    import os
    import tempfile

    from safetensors.torch import save

    from pipeline.artifact import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".model.safetensors.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(save(tensors, metadata={"format": "pt"}))
        os.replace(tmp, out / "model.safetensors")
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_json(out / "config.json", model.config.to_dict())
    return out


def read_config(path: Path) -> ScoreModelConfig:
    """The folder's ``config.json`` as a :class:`ScoreModelConfig` (raises :class:`ScoreModelError`)."""
    f = Path(path) / "config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ScoreModelError(f"{f}: cannot read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        raise ScoreModelError(f"{f}: model_type must be {MODEL_TYPE!r}")
    try:
        return ScoreModelConfig.from_dict(data)
    except ScoreModelError as exc:
        raise ScoreModelError(f"{f}: {exc}") from None


def load_score_model(path: Path) -> ScoreMLP:
    """Build a :class:`ScoreMLP` from a folder: safetensors only, every key and shape checked, finite weights.

    Raises:
        ScoreModelError: missing/invalid config.json or model.safetensors, missing/unexpected/misshapen tensors,
            non-finite weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    model = ScoreMLP(read_config(path))
    f = path / "model.safetensors"
    if not f.is_file():
        raise ScoreModelError(f"{path}: no model.safetensors")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ScoreModelError(f"{f}: not a valid safetensors file: {str(exc).splitlines()[0]}") from None
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise ScoreModelError(f"{f}: tensors do not match config.json (missing {missing}, unexpected {unexpected})")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ScoreModelError(
                f"{f}: tensor '{k}' has shape {tuple(v.shape)}, config.json implies {tuple(want[k].shape)}"
            )
        if not torch.isfinite(v).all():
            raise ScoreModelError(f"{f}: tensor '{k}' has non-finite values")
    model.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return model.eval()


def export_score_onnx(model: ScoreMLP, path: Path, *, opset: int) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically): inputs ``x`` (batch, d) and ``t`` (batch,) float32,
    output ``score`` (batch, d); dynamic batch; weights inline. Uses the dynamo exporter.

    Raises:
        RuntimeError: the exporter failed (its message).
    """
    import contextlib
    import io
    import logging
    import os
    import warnings

    import onnx
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(4, model.config.dim)
    t = torch.full((4,), 0.5)
    batch = Dim("batch", min=1)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            prog = torch.onnx.export(
                model.eval(),
                (x, t),
                dynamo=True,
                opset_version=opset,
                input_names=["x", "t"],
                output_names=["score"],
                dynamic_shapes={"x": {0: batch}, "t": {0: batch}},
                optimize=True,
                verbose=False,
            )
        finally:
            for q, lvl in zip(quiet, levels):
                q.setLevel(lvl)
    assert prog is not None  # f=None: the exporter returns the program
    proto = prog.model_proto
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
