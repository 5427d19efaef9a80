"""``edgepipe validate TUNE.yaml``: every check of a tune that needs no weights and no Ray.

The tune file is parsed as ``edgepipe tune`` parses it (:func:`pipeline.tune.spec.load_tune`: base pipeline,
space, objective, constraints, search), the base pipeline gets the run's preflight (targets, model folder,
calibration text), and then every trial the space can produce is built and checked by the stage schemas and
the stages' own pre-run checks: a choice that is valid alone but not with another one (``pattern: unstructured``
with ``ffn_sparsity``) fails here, naming the combination, instead of as an infeasible trial.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.schema import read_yaml
from pipeline.tune.spec import _TUNE_KEYS, Dimension, TuneSpec, apply_params, load_tune

__all__ = ["MAX_CHECKED_TRIALS", "TuneCheck", "check_trials", "check_tune", "is_tune_file"]

MAX_CHECKED_TRIALS = 4096  # a larger space is checked on an evenly spaced subset of this many combinations


@dataclass(frozen=True)
class TuneCheck:
    """What :func:`check_tune` established."""

    spec: TuneSpec
    preflight: Any  # pipeline.preflight.Preflight of the base pipeline
    combinations: int  # trial configurations the space can produce (ranges counted by their ends)
    checked: int  # of those, how many were built and checked


def is_tune_file(path: str | Path) -> bool:
    """Whether a YAML file is a tune file: a mapping with any of the tune-only top-level keys (``space``, ...)."""
    data = read_yaml(Path(path))
    return isinstance(data, dict) and any(k in data for k in _TUNE_KEYS)


def _values(d: Dimension) -> tuple[Any, ...]:
    """The values checked for a dimension: its choices, or the ends of its range."""
    if d.choices is not None:
        return d.choices
    return (d.low,) if d.low == d.high else (d.low, d.high)


def check_trials(spec: TuneSpec, pre: Any) -> tuple[int, int]:
    """Build every trial configuration of the space (ranges by their ends; an evenly spaced subset of
    :data:`MAX_CHECKED_TRIALS` when larger) and run the stage schemas and pre-run checks on each.

    Args:
        spec: the parsed tune file.
        pre: :class:`pipeline.preflight.Preflight` of ``spec.base`` (profiles, task, family, passages).

    Returns:
        (combinations, checked).

    Raises:
        ConfigError: the first failing trial, one line naming the file, key and the trial's parameters.
    """
    from pipeline.stage import RunPlan

    names = [d.name for d in spec.dimensions]
    values = [_values(d) for d in spec.dimensions]
    total = 1
    for v in values:
        total *= len(v)
    stride = max(1, -(-total // MAX_CHECKED_TRIALS))  # ceil: evenly spaced combinations when the space is large
    checked = 0
    for k, combo in enumerate(itertools.product(*values)):
        if k % stride:
            continue
        params = dict(zip(names, combo))
        shown = ", ".join(f"{n}={v}" for n, v in params.items())
        try:
            cfg = apply_params(spec, params)
        except ConfigError as exc:
            raise ConfigError(f"{str(exc).splitlines()[0]} (trial [{shown}])") from None
        plan = RunPlan(run=cfg, targets=pre.profiles, task=pre.task, family=pre.family, passages=len(pre.texts))
        for i, s in enumerate(cfg.stages):
            try:
                s.check(plan)
            except ValueError as exc:
                raise ConfigError(
                    f"{spec.source}: stages[{i}].{s.kind}: {str(exc).splitlines()[0]} (trial [{shown}])"
                ) from None
        checked += 1
    return total, checked


def check_tune(path: str | Path) -> TuneCheck:
    """Validate a tune file completely without starting Ray: the file, the base pipeline's preflight (targets,
    model folder, calibration text), and every trial (:func:`check_trials`).

    Raises:
        ConfigError / TargetError / ModelInputError: the first problem, one line naming the file and key (and,
            for a trial, its parameters).
    """
    from pipeline.preflight import preflight

    spec = load_tune(path)
    pre = preflight(spec.base, source=spec.source)
    total, checked = check_trials(spec, pre)
    return TuneCheck(spec=spec, preflight=pre, combinations=total, checked=checked)
