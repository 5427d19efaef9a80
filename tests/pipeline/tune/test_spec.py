"""The tune file is validated by the run schema before anything starts: one line naming file and key."""

from __future__ import annotations

import sys

import pytest

from pipeline.errors import ConfigError, EdgepipeError
from pipeline.tune.duration import parse_duration
from pipeline.tune.report import pareto
from pipeline.tune.spec import apply_params, parse_tune

BASE = {
    "targets": ["host-cpu"],
    "stages": [
        {"prune": {"pattern": "structured"}},
        {"export": {}},
        {"quantize": {}},
        {"validate": {}},
        {"benchmark": {}},
    ],
    "objective": {"minimize": ["latency_ms"], "constraints": {"cos_mean": ">= 0.97", "peak_rss_mb": "<= profile"}},
    "space": {"prune.ffn_sparsity": {"low": 0.0, "high": 0.75}, "quantize.precision": ["fp32", "int8"]},
}


def _with(**over):
    return {**BASE, **over}


def test_good_spec_parses_and_applies():
    spec = parse_tune(_with(), source="t.yaml")
    assert [d.name for d in spec.dimensions] == ["prune.ffn_sparsity", "quantize.precision"]
    assert spec.dimensions[0].integer is False and spec.dimensions[1].choices == ("fp32", "int8")
    cfg = apply_params(spec, {"prune.ffn_sparsity": 0.5, "quantize.precision": "int8"})
    assert cfg.stages[0].ffn_sparsity == 0.5 and cfg.stages[2].precision == "int8"
    assert spec.base.stages[0].ffn_sparsity is None  # the base is unchanged
    peak = next(c for c in spec.constraints if c.metric == "peak_rss_mb")
    from targets import load_target

    prof = load_target("host-cpu")
    assert peak.value is None and peak.violation(prof.memory_budget_mb + 1, prof) == 1 and peak.violation(10, prof) < 0


@pytest.mark.parametrize(
    "over, where",
    [
        ({"space": {"prune.sparsityy": [0.1]}}, "space.prune.sparsityy: unknown option 'sparsityy'"),
        ({"space": {"recover.steps": [0]}}, "space.recover.steps: stage 'recover' is not in the base pipeline"),
        ({"space": {"prune.sparsity": [0.1, 1.5]}}, "space.prune.sparsity"),
        ({"space": {"quantize.precision": ["int3"]}}, "space.quantize.precision"),
        ({"space": {"prune.ffn_sparsity": {"low": 0.8, "high": 0.2}}}, "a range needs numbers low <= high"),
        ({"space": {"prune.ffn_sparsity": {"low": 0.1, "hi": 0.2}}}, "unknown key 'hi'"),
        ({"space": {"prune": [1]}}, "a space key is 'stage.option'"),
        ({"space": {}}, "space: expected a mapping"),
        ({"space": {"quantize.per_target": [{"host-cpu": "int8"}]}}, "choices must be scalars"),
        ({"objective": {"minimize": ["speed"]}}, "objective.minimize: unknown metric 'speed'"),
        ({"objective": {"constraints": {"cos_mean": "<= profile"}}}, "'profile' (memory_budget_mb) bounds only"),
        ({"objective": {"constraints": {"cos_mean": "about 0.9"}}}, "objective.constraints.cos_mean"),
        ({"search": {"algorithm": "annealing"}}, "search.algorithm: unknown 'annealing'"),
        ({"search": {"algorithm": "grid"}}, "'grid' needs every space dimension to be a list"),
        ({"search": {"trial": 3}}, "search.trial: unknown key 'trial'"),
        ({"stages": [{"export": {}}, {"validate": {}}]}, "needs 'validate' and 'benchmark'"),
        ({"stages": [{"prune": {"sparsity": 2}}, {"validate": {}}, {"benchmark": {}}]}, "stages[0].prune"),
    ],
)
def test_bad_spec_is_one_line_config_error(over, where):
    with pytest.raises(ConfigError) as e:
        parse_tune(_with(**over), source="t.yaml")
    msg = str(e.value)
    assert msg.startswith("t.yaml: ") and where in msg and "\n" not in msg


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    from pipeline.tune.search import MissingExtra, _require

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtra) as e:
        _require()
    assert "'tune' extra" in str(e.value) and "edgepipe[tune]" in str(e.value) and isinstance(e.value, EdgepipeError)


def test_pareto_float64_oracle_on_odd_sizes():
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 13):
        pts = rng.integers(0, 4, size=(n, 3)).astype(np.float64)  # ties and duplicates included
        keys = {f"k{i}": list(p) for i, p in enumerate(pts)}
        want = [
            f"k{i}" for i in range(n) if not any(np.all(pts[j] <= pts[i]) and np.any(pts[j] < pts[i]) for j in range(n))
        ]
        assert pareto(keys) == want


def test_parse_duration():
    assert (
        parse_duration("30m") == 1800
        and parse_duration("90s") == 90
        and parse_duration("1.5h") == 5400
        and parse_duration("12") == 12
    )
    for bad in ("", "0", "-3m", "3d", "m"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_example_tune_file_parses(repo_root):
    from pipeline.tune.check import check_tune
    from pipeline.tune.spec import load_tune

    spec = load_tune(repo_root / "examples" / "tune-minilm.yaml")
    assert (
        spec.search.algorithm == "nsga2"
        and len(spec.dimensions) == 6
        and spec.base.targets == ["raspberry-pi-5", "host-cpu"]
    )
    res = check_tune(repo_root / "examples" / "tune-minilm.yaml")  # every trial it can draw is a valid run
    assert res.checked == res.combinations > 100


def _write_tune(tmp_path, tiny_models, **over):
    import yaml

    data = {**_with(**over), "model": {"path": str(tiny_models["bert"])}, "calibration": {"samples": 8, "heldout": 8}}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_tune_builds_every_trial_without_ray(tmp_path, tiny_models, monkeypatch):
    from pipeline.tune.check import check_tune, is_tune_file

    monkeypatch.setitem(sys.modules, "ray", None)  # validation must not need (or start) Ray
    path = _write_tune(tmp_path, tiny_models)
    res = check_tune(path)
    assert is_tune_file(path) and res.combinations == res.checked == 4  # range ends x 2 precisions
    assert res.preflight.family == "bert" and len(res.preflight.texts) >= 8


def test_check_tune_names_a_combination_that_fails_together(tmp_path, tiny_models):
    from pipeline.tune.check import check_tune

    # sparsegpt has no q/k-width criterion: each value is valid alone, the pair is not
    space = {"prune.method": ["attention", "sparsegpt"], "prune.structured_unit": ["heads+ffn", "qk_dims+ffn"]}
    with pytest.raises(ConfigError) as e:
        check_tune(_write_tune(tmp_path, tiny_models, space=space))
    msg = str(e.value)
    assert "\n" not in msg and "sparsegpt" in msg
    assert "trial [prune.method=sparsegpt, prune.structured_unit=qk_dims+ffn]" in msg


def test_trial_options_of_one_stage_are_applied_together():
    spec = parse_tune(
        _with(
            stages=[{"prune": {}}, {"validate": {}}, {"benchmark": {}}],
            space={"prune.pattern": ["structured"], "prune.ffn_sparsity": [0.5]},
        ),
        source="t.yaml",
    )
    # ffn_sparsity is only valid with pattern structured: one at a time, the order would decide
    cfg = apply_params(spec, {"prune.ffn_sparsity": 0.5, "prune.pattern": "structured"})
    assert cfg.stages[0].pattern == "structured" and cfg.stages[0].ffn_sparsity == 0.5


@pytest.mark.parametrize(
    "over, fragment",
    [
        ({"spaces": {}}, "unknown key 'spaces' (did you mean 'space'?)"),
        ({"search": {"algoritm": "grid"}}, "search.algoritm: unknown key 'algoritm' (did you mean 'algorithm'?)"),
        ({"space": {"prune.sparsty": [0.1]}}, "unknown option 'sparsty' of stage 'prune' (did you mean 'sparsity'?)"),
    ],
)
def test_tune_key_typos_say_did_you_mean(over, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        parse_tune(_with(**over), source="t.yaml")
    assert fragment in str(e.value)


def test_references_are_the_dense_model_and_the_peer_path():
    """dense: no prune/recover, fp32; peer: export + ORT dynamic int8 per-channel with quantize_dynamic's default
    op types, which include Gather (the peer's MiniLM is 22.9 MB, not 58 MB with an fp32 embedding table)."""
    from pipeline.tune.report import _reference_configs

    spec = parse_tune(_with(), source="t.yaml")
    refs = _reference_configs(spec)
    for cfg in refs.values():
        assert [s.kind for s in cfg.stages] == ["export", "quantize", "validate", "benchmark"]
    assert refs["dense"].stages[1].precision == "fp32"
    q = refs["peer"].stages[1]
    assert (q.precision, q.per_channel, q.quantize_embeddings) == ("int8", True, True)


def test_trials_keep_omitted_options_omitted(tmp_path):
    """A trial is the base pipeline as `edgepipe run` reads it: an option the user left out stays unset (prune's
    structured_unit then resolves per model family, qk_dims+ffn for BERT), in the trial and in best-<target>.yaml."""
    from pipeline.tune.report import best_recipe

    spec = parse_tune(_with(), source="t.yaml")
    cfg = apply_params(spec, {"prune.ffn_sparsity": 0.3, "quantize.precision": "int8"})
    prune = cfg.stages[0]
    assert prune.ffn_sparsity == 0.3 and "structured_unit" not in prune.model_fields_set
    assert "ffn_sparsity" in prune.model_fields_set and "pattern" in prune.model_fields_set
    recipe = best_recipe(spec, {"params": {"prune.ffn_sparsity": 0.3, "quantize.precision": "int8"}}, "host-cpu")
    assert recipe["stages"][0] == {"prune": {"pattern": "structured", "ffn_sparsity": 0.3}}
    assert recipe["stages"][2] == {"quantize": {"precision": "int8"}}


def test_resume_refuses_a_changed_tune(tmp_path):
    """--resume continues the same question: a changed base pipeline, space or objective is one line naming the
    part; search (trials, seed, algorithm) may change."""
    from pipeline.tune.search import _IDENTITY, _check_same_tune
    from pipeline.tune.spec import tune_identity
    from pipeline.tune.trial import Layout

    spec = parse_tune(_with(), source="t.yaml")
    layout = Layout(tmp_path / "w", spec)
    layout.out.mkdir(parents=True)
    (layout.out / _IDENTITY).write_text(__import__("json").dumps(tune_identity(spec)))
    prior = [{"key": "abc"}]
    _check_same_tune(spec, layout, prior)  # the same tune
    _check_same_tune(parse_tune(_with(search={"trials": 50, "seed": 3}), source="t.yaml"), layout, prior)
    stricter = {**BASE["objective"], "constraints": {"cos_mean": ">= 0.99", "peak_rss_mb": "<= profile"}}
    changes = {
        "objective": _with(objective=stricter),
        "space": _with(space={"prune.ffn_sparsity": {"low": 0.0, "high": 0.5}, "quantize.precision": ["fp32", "int8"]}),
        "base pipeline": _with(targets=["raspberry-pi-5"]),
    }
    for part, data in changes.items():
        with pytest.raises(ConfigError, match=f"t.yaml: the {part} changed since .* start a new --workdir"):
            _check_same_tune(parse_tune(data, source="t.yaml"), layout, prior)
    _check_same_tune(parse_tune(changes["objective"], source="t.yaml"), layout, [])  # nothing finished: fine


def test_grid_has_no_more_trials_than_points():
    """A grid of 2 x 2 runs 4 trials even when more are asked: the rest would only recall finished points."""
    space = {"prune.ffn_sparsity": [0.25, 0.5], "quantize.precision": ["fp32", "int8"]}
    spec = parse_tune(_with(space=space, search={"algorithm": "grid", "trials": 10}), source="t.yaml")
    assert spec.search.trials == 4
    with pytest.raises(ConfigError, match="'grid' needs every space dimension to be a list of choices"):
        parse_tune(_with(search={"algorithm": "grid"}), source="t.yaml")  # BASE has a {low, high} range
