"""Models people bring (issue 11): the model's limits against the pipeline's settings, shapes that follow
structural pruning, attention implementation per architecture, attention lowering across Llama variants.

Models are tiny random ones built from transformers config classes; encoders get the packaged MiniLM
tokenizer (as users' folders do), decoders the deterministic hash tokenizer (no tokenizer files).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline
from pipeline.errors import ConfigError, StageError
from pipeline.stages._common import cap_length, model_max_positions

pytestmark = pytest.mark.slow

CAL = {"samples": 8, "heldout": 8}


def _save(root: Path, name: str, model, *, minilm_tokenizer: bool) -> Path:
    out = root / name
    model.save_pretrained(out, safe_serialization=True)
    if minilm_tokenizer:
        from transformers import AutoTokenizer

        from pipeline.models import default_model_path

        AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(out)
    return out


def _build(root: Path, kind: str, **over) -> Path:
    """Tiny random models of the issue's families (seeded)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    enc = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    dec = dict(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if kind == "bert":
        m = tf.BertModel(tf.BertConfig(**{**enc, **over}))
    elif kind == "roberta":
        m = tf.RobertaModel(tf.RobertaConfig(**{**enc, "pad_token_id": 1, **over}))
    elif kind == "mpnet":
        m = tf.MPNetModel(tf.MPNetConfig(**{**enc, "vocab_size": 30527, **over}))
    elif kind == "distilbert":
        m = tf.DistilBertModel(
            tf.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64, **over)
        )
    elif kind == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(**{"vocab_size": 400, "n_embd": 32, "n_layer": 2, "n_head": 4, **over}))
    elif kind in ("llama", "llama_base"):
        cls = tf.LlamaForCausalLM if kind == "llama" else tf.LlamaModel
        m = cls(tf.LlamaConfig(**{**dec, "num_key_value_heads": 4, **over}))
    elif kind in ("qwen2", "qwen2_base"):
        cls = tf.Qwen2ForCausalLM if kind == "qwen2" else tf.Qwen2Model
        m = cls(tf.Qwen2Config(**{**dec, "num_key_value_heads": 2, **over}))
    else:
        raise ValueError(kind)
    return _save(
        root,
        kind + "".join(f"-{k}{v}" for k, v in over.items() if not isinstance(v, dict)),
        m.eval(),
        minilm_tokenizer=kind in ("bert", "roberta", "mpnet", "distilbert"),
    )


def _run(model: Path, stages: list, tmp_path: Path, **cal):
    from pipeline.model_folder import has_tokenizer_files

    # decoders here use the hash tokenizer: a folder without tokenizer files must say so (model.tokenizer: false)
    cfg = {
        "model": {"path": str(model), "tokenizer": has_tokenizer_files(model)},
        "targets": ["host-cpu"],
        "calibration": {**CAL, **cal},
        "stages": stages,
    }
    return pipeline.run(cfg, workdir=tmp_path / "run", progress=False)


# ----------------------------------------------------------------------------- 1. limits vs settings


@pytest.mark.parametrize("kind, over", [("bert", {"max_position_embeddings": 32}), ("gpt2", {"n_positions": 32})])
def test_lengths_are_capped_at_the_models_position_limit_with_a_note(tmp_path, kind, over):
    """calibration.max_length left at 128 on a 32-position model: capped, noted, parity holds (was an ORT broadcast /
    Gather error)."""
    rep = _run(_build(tmp_path, kind, **over), [{"export": {}}, {"validate": {"min_cos_mean": None}}], tmp_path)
    note = "calibration.max_length 128 capped at 32: the model takes at most 32 positions"
    assert all(note in s["metrics"]["notes"] for s in rep["stages"])
    assert rep["targets"]["host-cpu"]["parity"]["ok"]
    assert note in (tmp_path / "run" / "report.md").read_text()


def test_position_limits_read_from_the_modules(tmp_path):
    from pipeline.models import load_model

    # RoBERTa counts positions after the pad id: 34 rows hold 32 tokens
    assert model_max_positions(load_model(_build(tmp_path, "roberta", max_position_embeddings=34)).model) == 32
    assert model_max_positions(load_model(_build(tmp_path, "mpnet", max_position_embeddings=34)).model) == 32
    assert model_max_positions(load_model(_build(tmp_path, "distilbert", max_position_embeddings=40)).model) == 40
    llama = load_model(_build(tmp_path, "llama", max_position_embeddings=64))
    assert model_max_positions(llama.model) == 64  # rotary: the trained context from the config
    # a stage appending tokens reserves room for them (validate's generated tokens after an 8-token prompt)
    assert cap_length(llama, 100, "validate.generation_tokens", None, reserve=8) == 56
    assert cap_length(llama, 20, "validate.generation_tokens", None, reserve=8) == 20


def test_tokenizer_larger_than_the_embedding_is_refused_naming_both(tmp_path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    model = _save(
        tmp_path,
        "gpt2-minilm-tok",
        tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4)),
        minilm_tokenizer=True,
    )
    with pytest.raises(
        ConfigError, match=r"tokenizer \(30522 tokens\) produced id \d+ but the model's input embedding has 400 rows"
    ):
        _run(model, [{"export": {}}], tmp_path)


# ----------------------------------------------------------------------------- 3. shapes after structural pruning


@pytest.mark.parametrize(
    "kind, over",
    [
        ("gpt2", {}),  # prune_heads: config.n_head stays 4
        ("llama", {}),  # MHA
        ("qwen2", {}),  # GQA 4/2, q/k/v biases
        ("llama", {"num_key_value_heads": 2, "head_dim": 16}),  # GQA with explicit head_dim != hidden / heads
    ],
)
def test_structured_heads_pruning_then_kv_cache_export_validate_and_generation(tmp_path, kind, over):
    stages = [
        {"prune": {"method": "wanda", "pattern": "structured", "structured_unit": "heads", "sparsity": 0.5}},
        {"export": {}},
        {"validate": {"min_cos_mean": None, "bundle": False}},
    ]
    rep = _run(_build(tmp_path, kind, **over), stages, tmp_path, max_length=32)
    assert all(u["heads"] for u in rep["stages"][0]["metrics"]["removed_units"])
    io = json.loads((tmp_path / "run" / "stages" / "03-validate" / ".stage.json").read_text())["artifact"]["targets"][
        "host-cpu"
    ]["io"]
    dense_kv = over.get("num_key_value_heads") or (2 if kind == "qwen2" else 4)
    assert io["with_past"] and io["num_kv_heads"] == dense_kv // 2  # half the KV groups removed
    assert io["head_dim"] == over.get("head_dim", 8)
    t = rep["targets"]["host-cpu"]
    assert t["parity"]["ok"]
    assert t["generation"]["identical"] and t["generation"]["tokens"] == 8  # greedy ORT (KV cache) == PyTorch


# ----------------------------------------------------------------------------- 4. attention implementation per architecture


def test_mpnet_falls_back_to_eager_and_exports_quantizes_validates(tmp_path):
    from pipeline.models import load_model

    path = _build(tmp_path, "mpnet")
    assert load_model(path).model.config._attn_implementation == "eager"  # MPNet has no SDPA path
    rep = _run(path, [{"export": {}}, {"quantize": {"precision": "int8"}}, {"validate": {"bundle": False}}], tmp_path)
    t = rep["targets"]["host-cpu"]
    assert t["precision"] == "int8" and t["parity"]["ok"] and t["fidelity"]["cos_mean"] > 0.98


def test_distilbert_with_a_bert_tokenizer_through_the_attention_stage(tmp_path):
    """DistilBERT is BERT family: the attention stage swaps it; the BERT tokenizer's token_type_ids are not fed."""
    rep = _run(
        _build(tmp_path, "distilbert"),
        [{"attention": {"kernel": "flash"}}, {"export": {}}, {"validate": {"min_cos_mean": None, "bundle": False}}],
        tmp_path,
        max_length=24,
    )
    swap = rep["stages"][0]["metrics"]
    assert swap["replaced"] == 2 and swap["max_abs_diff_vs_reference"] < 1e-5
    assert rep["stages"][1]["metrics"]["exports"]["opset23"]["attention"]["onnx_attention"]["Attention"] == 2
    assert rep["targets"]["host-cpu"]["parity"]["ok"]


# ----------------------------------------------------------------------------- 5. attention lowering across Llama variants


@pytest.mark.parametrize(
    "kind, over",
    [
        ("llama_base", {}),  # the case, smaller: a bare LlamaModel without LM head
        (
            "llama_base",
            {
                "num_key_value_heads": 2,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            },
        ),
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
    ],
)
def test_flash_lowering_exports_every_llama_variant(tmp_path, kind, over):
    rep = _run(
        _build(tmp_path, kind, **over),
        [{"attention": {"kernel": "flash"}}, {"export": {}}, {"validate": {"min_cos_mean": None, "bundle": False}}],
        tmp_path,
        max_length=24,
    )
    att = rep["stages"][1]["metrics"]["exports"]["opset23"]["attention"]["onnx_attention"]
    assert att["Attention"] == 2 and att["max_abs_diff_vs_torch"] < 1e-4
    assert rep["targets"]["host-cpu"]["parity"]["ok"]


def test_base_llama_block_sparse_is_causal(tmp_path):
    """A bare LlamaModel (feature-extraction) is still causal: a bidirectional window is refused, causal_window lowers."""
    path = _build(tmp_path, "llama_base")
    with pytest.raises(ConfigError, match="see the future"):  # refused before anything runs (preflight)
        _run(path, [{"attention": {"kernel": "block_sparse", "block_size": 8, "pattern": "window"}}], tmp_path / "a")
    rep = _run(
        path,
        [
            {"attention": {"kernel": "block_sparse", "block_size": 8, "pattern": "causal_window"}},
            {"export": {}},
            {"validate": {"min_cos_mean": None}},
        ],
        tmp_path / "b",
        max_length=40,
    )
    assert rep["targets"]["host-cpu"]["parity"]["ok"]


def test_unlowerable_variants_are_one_line(tmp_path):
    dyn = _build(tmp_path, "llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(StageError, match=r"rope_type 'dynamic' \(config.json\) recomputes the rotary frequencies") as e:
        _run(dyn, [{"export": {}}], tmp_path / "a")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    import torch
    import transformers as tf

    torch.manual_seed(0)
    mistral = _save(
        tmp_path,
        "mistral",
        tf.MistralForCausalLM(
            tf.MistralConfig(
                vocab_size=400,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                sliding_window=16,
            )
        ),
        minilm_tokenizer=False,
    )
    with pytest.raises(StageError, match="sliding window of 16 tokens"):
        _run(
            mistral,
            [{"attention": {"kernel": "block_sparse", "block_size": 8, "pattern": "causal_window"}}],
            tmp_path / "b",
        )


# ----------------------------------------------------------------------------- 8. defaults that work


def test_structured_defaults_follow_the_family_and_warn_about_missing_text_recover_and_validate(tiny_models, tmp_path):
    from pipeline.stages.recover import default_steps, passages_needed

    assert (default_steps(0.0), default_steps(0.25), default_steps(0.5)) == (200, 1000, 2000)
    assert passages_needed(0.5) == 3000 and passages_needed(0.01) == 200
    # no validate and no recover after a structured prune: both are warned about; BERT family -> q/k width + FFN
    rep = _run(
        tiny_models["bert"],
        [{"prune": {"method": "wanda", "pattern": "structured", "sparsity": 0.5}}],
        tmp_path / "a",
        max_length=24,
    )
    m = rep["stages"][0]["metrics"]
    assert m["structured_unit"] == "qk_dims+ffn"
    assert any("q/k width 0.5, FFN 0.75" in n for n in m["notes"])  # hidden 32, FFN 64: 0.5 * (1 + 32/64) = 0.75
    assert {tuple(u["qk_width"]) for u in m["removed_units"]} == {(8, 4)}  # 8-wide q/k heads halved
    assert {u["ffn"] for u in m["removed_units"]} == {48}
    assert any("no validate stage follows" in w for w in m["warnings"]) and any(
        "without a recover stage" in w for w in m["warnings"]
    )
    text = (tmp_path / "a" / "run" / "report.md").read_text()
    assert "no validate stage follows" in text
    # a decoder keeps heads+ffn; recover with omitted steps scales them and says how much text it needs
    rep = _run(
        tiny_models["gpt2"],
        [
            {"prune": {"method": "wanda", "pattern": "structured", "sparsity": 0.1}},
            {"recover": {"samples": 16, "batch_size": 16}},
        ],
        tmp_path / "b",
        max_length=16,
    )
    p, r = rep["stages"][0]["metrics"], rep["stages"][1]["metrics"]
    assert p["structured_unit"] == "heads+ffn" and not any("recover" in w for w in p["warnings"])
    assert 0 < p["sparsity"]["overall"] < 0.1
    assert r["steps"] == default_steps(p["sparsity"]["overall"])
    assert any(f"about {passages_needed(p['sparsity']['overall'])} are needed" in w for w in r["warnings"])


# ----------------------------------------------------------------------------- 2. size limits


def test_external_data_is_carried_through_quantize_ort_validate_benchmark_and_bundle(
    tiny_models, tmp_path, monkeypatch
):
    """The switch point is a setting, so a tiny model takes the >2 GiB path (model.onnx + model.onnx.data) end to end;
    android-arm64's int8 quantizes its embedding tables chunk by chunk (exporters.chunked_gather) as a big model's."""
    import onnx

    import exporters.chunked_gather as cg

    chunked, real = [], cg.prequantize_gather_tables

    def spy(*args, **kwargs):
        done = real(*args, **kwargs)
        chunked.extend(done)
        return done

    monkeypatch.setattr(cg, "prequantize_gather_tables", spy)
    stages = [
        {"export": {"external_data_mb": 0}},
        {"quantize": {"per_target": {"host-cpu": "fp32"}, "chunked_embeddings_mb": 0}},
        {"validate": {"min_cos_mean": None}},
        {"benchmark": {"runs": 2, "warmup": 0, "seq": 16}},
    ]
    cfg = {
        "model": {"path": str(tiny_models["bert"])},
        "targets": ["host-cpu", "android-arm64"],
        "calibration": {**CAL, "max_length": 24},
        "stages": stages,
    }
    rep = pipeline.run(cfg, workdir=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert rep["stages"][0]["metrics"]["exports"]["opset18"]["external_data"]
    q = rep["stages"][1]["metrics"]["targets"]
    assert (
        q["host-cpu"]["external_data"]
        and q["android-arm64"]["external_data"]
        and q["android-arm64"]["ort_size_bytes"] > 0
    )
    for name in ("host-cpu", "android-arm64"):
        graph = onnx.load(str(run / name / "model.onnx"), load_external_data=False)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
        data = run / name / "model.onnx.data"
        assert data.stat().st_size > 16 * 1024  # the weight matrices live in the data file
        t = rep["targets"][name]
        assert t["size_bytes"] == data.stat().st_size + (run / name / "model.onnx").stat().st_size
        assert t["parity"]["ok"] and t["latency_ms"]["p50"] > 0
    assert (run / "host-cpu" / "bundle" / "model.onnx.data").is_file()  # the bundle runs standalone on the device
    assert (run / "android-arm64" / "model.ort").is_file()
    assert "model.embeddings.word_embeddings.weight" in {t.name for t in chunked}


def test_ort_format_refuses_models_over_its_limit(tmp_path, monkeypatch):
    import exporters.mobile as mobile
    from tests.runtimes.test_session import tiny_encoder

    src = tiny_encoder(tmp_path / "model.onnx")
    monkeypatch.setattr(mobile, "ORT_FORMAT_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="cannot go into ORT format, a single flatbuffer of at most 2 GiB"):
        mobile.to_ort_format(src, tmp_path / "out")
