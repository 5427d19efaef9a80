"""The attention stage from YAML/API: swap, count, check, then per-target lowering that export verifies."""

from __future__ import annotations

import pytest

import pipeline
from pipeline.errors import ConfigError

pytestmark = pytest.mark.slow


def _run(model, attention, tmp_path, targets=("host-cpu", "jetson-orin-nano"), max_length=24):
    cfg = {
        "model": {"path": str(model)},
        "targets": list(targets),
        "calibration": {"samples": 4, "heldout": 8, "max_length": max_length},
        "stages": [{"attention": attention}, {"export": {}}, {"validate": {"min_cos_mean": None}}],
    }
    return pipeline.run(cfg, workdir=tmp_path / "run", progress=False)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("kernel", ["flash", "small_cache"])
def test_dense_kernels_lower_to_each_targets_fused_op(tiny_models, tmp_path, family, kernel):
    rep = _run(tiny_models[family], {"kernel": kernel, "cache_words": 4096}, tmp_path)
    swap, export = rep["stages"][0]["metrics"], rep["stages"][1]["metrics"]["exports"]["opset23"]
    assert swap["kernel"] == kernel and swap["replaced"] == 2 and swap["max_abs_diff_vs_reference"] < 1e-4
    # host-cpu prefers the ONNX Attention op, the Jetson profile com.microsoft MultiHeadAttention
    assert export["attention"]["onnx_attention"]["Attention"] == 2
    assert export["attention"]["ms_mha"]["com.microsoft.MultiHeadAttention"] == 2
    assert all(v["unfused_softmax_attention"] == 0 for v in export["attention"].values())
    assert all(t["parity"]["ok"] for t in rep["targets"].values())


@pytest.mark.parametrize(
    "family, pattern",
    [("bert", "window"), ("bert", "global_window"), ("llama", "causal_window"), ("gpt2", "causal_window")],
)
def test_block_sparse_lowers_to_kept_block_subgraphs(tiny_models, tmp_path, family, pattern):
    att = {
        "kernel": "block_sparse",
        "block_size": 8,
        "pattern": pattern,
        "window_blocks": 1,
        "global_blocks": 1 if pattern == "global_window" else 0,
    }
    rep = _run(tiny_models[family], att, tmp_path, targets=("host-cpu",), max_length=48)  # 6 blocks of 8
    swap = rep["stages"][0]["metrics"]
    assert swap["replaced"] == 2 and swap["block_density"] < 1.0
    assert swap["max_abs_diff_vs_reference"] < 1e-4  # vs dense attention under the same block mask
    counts = rep["stages"][1]["metrics"]["exports"]["opset23"]["attention"]["block_sparse"]
    assert counts["block_sparse"] == 2 and counts["Attention"] == 0 and counts["unfused_softmax_attention"] == 0
    assert counts["max_abs_diff_vs_torch"] < 1e-4
    assert rep["targets"]["host-cpu"]["parity"]["ok"]


def test_bidirectional_window_on_a_decoder_is_refused(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\].attention: .*see the future"):  # refused before anything runs
        _run(
            tiny_models["gpt2"],
            {"kernel": "block_sparse", "block_size": 8, "pattern": "window"},
            tmp_path,
            targets=("host-cpu",),
        )


def test_bad_attention_config():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.attention\.kernl"):
        pipeline.run({"stages": [{"attention": {"kernl": "flash"}}]}, workdir="/nonexistent/never-written")
    with pytest.raises(ConfigError, match="global_blocks"):
        pipeline.run(
            {"stages": [{"attention": {"kernel": "block_sparse", "pattern": "global_window"}}]},
            workdir="/nonexistent/never-written",
        )
