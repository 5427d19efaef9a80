"""The tune file: a base pipeline (exactly as ``edgepipe run`` reads it) plus ``objective``, ``space``, ``search``.

Everything is checked before Ray starts: the base pipeline by the run schema, every value of every space
dimension by the stage's own config class (so ``prune.sparsity: [1.5]`` fails here, naming the key), the
objective's metrics against :data:`pipeline.tune.metrics.METRICS`, the algorithm against :data:`SAMPLERS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from pipeline.config import PipelineConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.schema import Frozen, did_you_mean, format_validation_error, read_yaml
from pipeline.tune.metrics import METRICS

__all__ = [
    "SAMPLERS",
    "Constraint",
    "Dimension",
    "TuneSpec",
    "apply_params",
    "grid_size",
    "load_tune",
    "parse_tune",
    "tune_identity",
]

_TUNE_KEYS = ("objective", "space", "search", "cache", "references")
_CONSTRAINT_RE = re.compile(r"^\s*(<=|>=|<|>)\s*(\S+)\s*$")
_PROFILE_METRICS = ("peak_rss_mb", "size_mb")  # metrics that "<= profile" (memory_budget_mb) can bound


def _samplers() -> dict[str, Callable[..., Any]]:
    """Optuna samplers by the name used in ``search.algorithm`` (imported lazily: optuna is optional)."""

    def nsga2(seed, population, space):
        import optuna

        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population, constraints_func=_constraints)

    def nsga3(seed, population, space):
        import optuna

        return optuna.samplers.NSGAIIISampler(seed=seed, population_size=population, constraints_func=_constraints)

    def tpe(seed, population, space):
        import optuna

        return optuna.samplers.TPESampler(seed=seed, constraints_func=_constraints)

    def random(seed, population, space):
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)

    def grid(seed, population, space):
        from pipeline.tune.samplers import UnvisitedGridSampler

        return UnvisitedGridSampler({d.name: list(d.choices) for d in space}, seed=seed)

    return {"nsga2": nsga2, "nsga3": nsga3, "tpe": tpe, "random": random, "grid": grid}


SAMPLERS = _samplers()


def _constraints(trial: Any) -> list[float]:  # module level: Ray pickles the sampler with the searcher
    """Optuna constraint values of a finished trial (<= 0 feasible), set by the searcher from the trial result."""
    return list(trial.user_attrs.get("constraints", [1.0]))


class Dimension(Frozen):
    """One search dimension: ``stage.option`` with a list of choices or a numeric range."""

    name: str
    stage: str
    option: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False


class Constraint(Frozen):
    metric: str
    op: str
    value: float | None = None  # None: the profile's memory_budget_mb
    text: str

    def limit(self, profile: Any) -> float:
        return float(profile.memory_budget_mb) if self.value is None else self.value

    def violation(self, x: float | None, profile: Any) -> float:
        """How far ``x`` is outside the bound (<= 0: satisfied; a missing value violates by 1)."""
        if x is None:
            return 1.0
        lim = self.limit(profile)
        gap = (lim - x) if self.op in (">=", ">") else (x - lim)
        if self.op in (">", "<") and gap == 0:
            return 1e-12
        return gap


class Objective(Frozen):
    minimize: list[str] = Field(
        default_factory=lambda: ["latency_ms"],
        min_length=1,
        description="metrics to minimise, per target; the first one picks the best recipe",
    )
    maximize: list[str] = Field(default_factory=list, description="metrics to maximise, per target")
    constraints: dict[str, str] = Field(
        default_factory=dict, description="metric: '>= 0.97' / '<= 100' / '<= profile' (memory_budget_mb)"
    )


class Search(Frozen):
    algorithm: str = Field("nsga2", description="Optuna sampler: " + ", ".join(SAMPLERS))
    trials: int = Field(24, ge=1)
    seed: int = 0
    population: int | None = Field(None, ge=2, description="NSGA-II/III population; omitted = max(2, trials // 3)")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once; omitted = one per CPU Ray has")
    cpus_per_trial: float = Field(1.0, gt=0)
    retries: int = Field(
        1,
        ge=0,
        description="re-runs of a trial whose process died (killed, out of memory, native crash) before it is"
        " recorded as failed",
    )


class CacheOptions(Frozen):
    dir: str | None = Field(
        None, description="shared stage cache; omitted = <workdir>/cache (use shared storage on a cluster)"
    )


class References(Frozen):
    dense: bool = Field(True, description="also run the base pipeline without prune/recover at fp32 (plotted)")
    peer: bool = Field(True, description="also run the peer path: export + ORT dynamic int8 per-channel (plotted)")


class TuneSpec(Frozen):
    base: PipelineConfig
    source: str
    objective: Objective
    dimensions: tuple[Dimension, ...]
    constraints: tuple[Constraint, ...]
    search: Search
    cache: CacheOptions
    references: References

    def directions(self) -> list[tuple[str, str]]:
        return [(m, "min") for m in self.objective.minimize] + [(m, "max") for m in self.objective.maximize]


def grid_size(dims: tuple[Dimension, ...]) -> int:
    """Number of points of the full grid of ``dims`` (choices only); a grid search has no more trials than this."""
    return math.prod(len(d.choices or ()) for d in dims)


def tune_identity(spec: TuneSpec) -> dict[str, Any]:
    """What the finished trials of a tune were measured under, by part: the base pipeline (as the run schema
    resolved it), the space and the objective with its constraints. A journal's records are only valid for the
    same parts (``--resume`` compares them); ``search``, ``cache`` and ``references`` may change between runs."""
    return {
        "base pipeline": spec.base.to_data(),
        "space": [d.model_dump(mode="json") for d in spec.dimensions],
        "objective": spec.objective.model_dump(mode="json"),
    }


def _model(cls, data: Any, source: str, key: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, prefix=key, model=cls)) from None


def _stage_index(base: PipelineConfig, kind: str, where: str) -> int:
    idx = [i for i, s in enumerate(base.stages) if s.kind == kind]
    if not idx:
        raise ConfigError(
            f"{where}: stage '{kind}' is not in the base pipeline's stages ({', '.join(s.kind for s in base.stages)})"
        )
    if len(idx) > 1:
        raise ConfigError(
            f"{where}: stage '{kind}' appears {len(idx)} times in the base pipeline; a space key must name one stage"
        )
    return idx[0]


def _check_value(base: PipelineConfig, kind: str, option: str, value: Any, where: str) -> None:
    i = _stage_index(base, kind, where)
    stage = base.stages[i]
    try:
        type(stage).model_validate({**stage.model_dump(mode="json", exclude_unset=True), option: value})
    except ValidationError as exc:
        if all(not e["loc"] for e in exc.errors()):
            return  # a cross-option check of the stage: judged per trial (pipeline.tune.check), with its other values
        raise ConfigError(
            format_validation_error(
                exc, source=where.split(": ")[0], prefix=f"{where.split(': ', 1)[1]}", model=type(stage)
            )
        ) from None


def _parse_dimension(base: PipelineConfig, name: Any, body: Any, source: str) -> Dimension:
    where = f"{source}: space.{name}"
    if not isinstance(name, str) or name.count(".") != 1:
        raise ConfigError(f"{where}: a space key is 'stage.option' (e.g. prune.sparsity)")
    kind, option = name.split(".")
    i = _stage_index(base, kind, where)
    fields = type(base.stages[i]).model_fields
    if option not in fields:
        raise ConfigError(
            f"{where}: unknown option '{option}' of stage '{kind}'{did_you_mean(option, fields)}"
            f" (options: {', '.join(sorted(fields))})"
        )
    if isinstance(body, list):
        if not body:
            raise ConfigError(f"{where}: empty list of choices")
        for v in body:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise ConfigError(
                    f"{where}: choices must be scalars (number, string, bool, null), got {type(v).__name__}"
                )
            _check_value(base, kind, option, v, where)
        if len(set(map(repr, body))) != len(body):
            raise ConfigError(f"{where}: a choice is listed twice")
        return Dimension(name=name, stage=kind, option=option, choices=tuple(body))
    if isinstance(body, dict):
        extra = sorted(set(body) - {"low", "high", "step", "log"})
        if extra:
            raise ConfigError(f"{where}: unknown key '{extra[0]}' (a range has low, high, step, log)")
        lo, hi = body.get("low"), body.get("high")
        if not (
            isinstance(lo, (int, float))
            and isinstance(hi, (int, float))
            and not isinstance(lo, bool)
            and not isinstance(hi, bool)
            and lo <= hi
        ):
            raise ConfigError(f"{where}: a range needs numbers low <= high, got low={lo!r}, high={hi!r}")
        step = body.get("step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            raise ConfigError(f"{where}.step: expected a positive number, got {step!r}")
        integer = all(isinstance(v, int) for v in (lo, hi)) and (step is None or isinstance(step, int))
        log = bool(body.get("log", False))
        if log and lo <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0")
        for v in (lo, hi):
            _check_value(base, kind, option, v, where)
        return Dimension(name=name, stage=kind, option=option, low=lo, high=hi, step=step, log=log, integer=integer)
    raise ConfigError(f"{where}: expected a list of choices or a range {{low, high}}, got {type(body).__name__}")


def _parse_constraint(metric: Any, text: Any, source: str) -> Constraint:
    where = f"{source}: objective.constraints.{metric}"
    if metric not in METRICS:
        raise ConfigError(f"{where}: unknown metric '{metric}' (known: {', '.join(METRICS)})")
    m = _CONSTRAINT_RE.match(str(text))
    if not m:
        raise ConfigError(f"{where}: expected '>= NUMBER', '<= NUMBER' or '<= profile', got {text!r}")
    op, val = m.groups()
    if val == "profile":
        if metric not in _PROFILE_METRICS or op not in ("<=", "<"):
            raise ConfigError(
                f"{where}: 'profile' (memory_budget_mb) bounds only {' / '.join(_PROFILE_METRICS)} from above"
            )
        return Constraint(metric=metric, op=op, value=None, text=f"{op} profile")
    try:
        num = float(val)
    except ValueError:
        raise ConfigError(f"{where}: '{val}' is not a number") from None
    return Constraint(metric=metric, op=op, value=num, text=f"{op} {val}")


def parse_tune(data: Any, *, source: str = "<tune config>", base_dir: Path | None = None) -> TuneSpec:
    """Validate a tune file's data; raises :class:`ConfigError` (one line naming the file and key)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the tune file must be a mapping, got {type(data).__name__}")
    data = dict(data)
    allowed = [*PipelineConfig.model_fields, *_TUNE_KEYS]
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{source}: unknown key '{str(key)[:60]}'{did_you_mean(key, allowed)}")
    parts = {k: data.pop(k, None) for k in _TUNE_KEYS}
    base = parse_config(data, source=source, base_dir=base_dir)
    if not base.stages:
        raise ConfigError(f"{source}: stages: the base pipeline has no stages")
    if not any(s.kind == "benchmark" for s in base.stages) or not any(s.kind == "validate" for s in base.stages):
        raise ConfigError(f"{source}: stages: a tune needs 'validate' and 'benchmark' stages to measure its objective")
    objective = _model(Objective, parts["objective"], source, "objective")
    for key in ("minimize", "maximize"):
        for m in getattr(objective, key):
            if m not in METRICS:
                raise ConfigError(f"{source}: objective.{key}: unknown metric '{m}' (known: {', '.join(METRICS)})")
    constraints = tuple(_parse_constraint(k, v, source) for k, v in objective.constraints.items())
    space = parts["space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{source}: space: expected a mapping of 'stage.option' dimensions, got {space!r}")
    dims = tuple(_parse_dimension(base, k, v, source) for k, v in space.items())
    search = _model(Search, parts["search"], source, "search")
    if search.algorithm not in SAMPLERS:
        raise ConfigError(f"{source}: search.algorithm: unknown '{search.algorithm}' (known: {', '.join(SAMPLERS)})")
    if search.algorithm == "grid":
        if any(d.choices is None for d in dims):
            raise ConfigError(
                f"{source}: search.algorithm: 'grid' needs every space dimension to be a list of choices"
                " (a {low, high} range has no grid: use nsga2, tpe or random)"
            )
        size = grid_size(dims)
        if search.trials > size:  # more would only recall finished points from the journal
            search = search.model_copy(update={"trials": size})
    cache = _model(CacheOptions, parts["cache"], source, "cache")
    if cache.dir is not None and base_dir is not None and not Path(cache.dir).is_absolute():
        cache = CacheOptions(dir=str((base_dir / cache.dir).resolve()))
    refs = _model(References, parts["references"], source, "references")
    return TuneSpec(
        base=base,
        source=source,
        objective=objective,
        dimensions=dims,
        constraints=constraints,
        search=search,
        cache=cache,
        references=refs,
    )


def load_tune(path: str | Path) -> TuneSpec:
    path = Path(path)
    return parse_tune(read_yaml(path), source=str(path), base_dir=path.resolve().parent)


def apply_params(spec: TuneSpec, params: Mapping[str, Any]) -> PipelineConfig:
    """The trial's pipeline: the base with each ``stage.option`` replaced, validated by the stage's config class.

    The options of one stage are replaced together, so a stage's cross-option checks see the trial's values,
    not a half-updated mix of the base and the trial.
    """
    stages = list(spec.base.stages)
    updates: dict[int, dict[str, Any]] = {}
    for name, value in params.items():
        kind, option = name.split(".")
        i = _stage_index(spec.base, kind, f"{spec.source}: space.{name}")
        updates.setdefault(i, {})[option] = value
    for i, update in updates.items():
        try:
            # only the options the user wrote, plus the trial's: an omitted option keeps its "omitted" meaning
            # (e.g. prune's structured_unit, chosen per model family when unset), exactly as `edgepipe run` reads it
            stages[i] = type(stages[i]).model_validate(
                {**stages[i].model_dump(mode="json", exclude_unset=True), **update}
            )
        except ValidationError as exc:
            keys = "/".join(f"{stages[i].kind}.{o}" for o in update)
            raise ConfigError(
                format_validation_error(exc, source=spec.source, prefix=f"space.{keys}", model=type(stages[i]))
            ) from None
    return spec.base.model_copy(update={"stages": stages})
