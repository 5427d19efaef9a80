"""A new pruning method is one file plus one registration: the toy method of ``toy_method.py`` is accepted by the
prune stage's config (YAML validation) and run by ``prune_model`` on a tiny model, with no other change."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.pruning import PruneConfig, blocks, prune_model
from pipeline.pruning.registry import PRUNE_METHODS, prune_method_names, register_prune_method

from .conftest import random_batches, tiny_model

TOY = "tests.pipeline.pruning.toy_method"


@pytest.fixture
def toy():
    mod = importlib.import_module(TOY)
    mod.CALLS.clear()
    yield mod
    PRUNE_METHODS.pop("toy_energy")
    sys.modules.pop(TOY)


def test_builtin_methods_are_registered() -> None:
    assert {"magnitude", "wanda", "sparsegpt", "attention"} <= set(prune_method_names())
    assert not PRUNE_METHODS["magnitude"].needs_calibration and PRUNE_METHODS["wanda"].needs == {"sq_norms"}
    assert PRUNE_METHODS["sparsegpt"].reconstructs and PRUNE_METHODS["attention"].qk_rule is not None
    assert PRUNE_METHODS["attention"].prune_matrix is None and PRUNE_METHODS["sparsegpt"].qk_width_rule is None


def test_toy_method_through_config_validation_and_prune_model(toy) -> None:
    from pipeline.config import parse_config

    cfg = parse_config({"targets": ["host-cpu"], "stages": [{"prune": {"method": "toy_energy", "sparsity": 0.5}}]})
    assert cfg.stages[0].method == "toy_energy"

    model = tiny_model("bert").eval()
    batches = random_batches()
    res = prune_model(model, PruneConfig(method="toy_energy", sparsity=0.5), batches)
    pruned = [ref for b in blocks(model) for ref in b.matrices().values()]
    assert len(toy.CALLS) == len(pruned) == 2 * 6  # q, k, v, o, ffn_in, ffn_out per block
    for ref in pruned:  # half of every row removed, exactly
        zeros = (ref.weight == 0).sum(1)
        assert torch.equal(zeros, torch.full_like(zeros, ref.weight.shape[1] // 2)), ref.qualname
    assert res.metrics["method"] == "toy_energy" and res.metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=0.02)

    # needs sq_norms: calibration text is required, like Wanda
    with pytest.raises(ValueError, match="'toy_energy' needs calibration batches"):
        prune_model(tiny_model("bert"), PruneConfig(method="toy_energy"), [])
    # the toy has no q/k-width criterion and no reconstruction: the config says so, naming the capable methods
    with pytest.raises(ValueError, match=r"reconstructing method \['attention', 'sparsegpt'\]"):
        PruneConfig(method="toy_energy", error_correction=True)
    with pytest.raises(ValueError, match="q/k-width criterion"):
        PruneConfig(method="toy_energy", pattern="structured", structured_unit="qk_dims")
    # and it is a valid companion of the attention method
    from pipeline.pruning.attention_objective import AttentionMethodConfig

    assert AttentionMethodConfig(companion="toy_energy").companion == "toy_energy"


def test_unknown_methods_are_refused_with_the_registered_names() -> None:
    from pipeline.config import parse_config

    with pytest.raises(
        ConfigError, match=r"stages\[0\]\.prune\.method: .*'attention', 'magnitude', 'sparsegpt', 'wanda'"
    ):
        parse_config({"targets": ["host-cpu"], "stages": [{"prune": {"method": "obs"}}]})
    with pytest.raises(ValueError, match="registered twice"):
        register_prune_method("wanda", description="again")(lambda w, i, c: w)
    with pytest.raises(ValueError, match="unknown statistics"):
        register_prune_method("toy_bad", description="x", needs=("activations",))
