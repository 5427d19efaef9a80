"""Tests for pipeline.models: family/task inference, safe offline loading, save round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from pipeline.models import (
    FAMILIES,
    TASKS,
    ModelLoadError,
    default_model_path,
    infer_task,
    load_model,
    model_family,
    save_model,
)
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        make_tiny_model(root, family)
    return root


@pytest.mark.parametrize(
    ("family", "task", "model_cls"),
    [
        ("bert", "feature-extraction", "BertModel"),
        ("gpt2", "text-generation", "GPT2LMHeadModel"),
        ("llama", "text-generation", "LlamaForCausalLM"),
    ],
)
def test_load_tiny(tiny_root: Path, family: str, task: str, model_cls: str) -> None:
    loaded = load_model(tiny_root / family)
    assert (loaded.family, loaded.task, loaded.model_type) == (family, task, family)
    assert type(loaded.model).__name__ == model_cls
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.path == (tiny_root / family).resolve()
    tok = loaded.tokenizer
    assert tok is not None
    assert len(tok) == loaded.model.config.vocab_size
    ids = tok("the quick brown fox")["input_ids"]
    assert tok.unk_token_id not in ids  # real vocabulary, not all-unknown
    if loaded.is_decoder:
        assert tok.pad_token == tok.eos_token


def test_llama_is_gqa(tiny_root: Path) -> None:
    cfg = load_model(tiny_root / "llama").model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)


def test_decoder_without_pad_gets_eos(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "gpt2")
    cfg_path = path / "special_tokens_map.json"
    special = json.loads(cfg_path.read_text())
    special.pop("pad_token")
    cfg_path.write_text(json.dumps(special))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    loaded = load_model(path)
    assert loaded.tokenizer is not None and loaded.tokenizer.pad_token == "</s>"


def test_no_tokenizer_gives_none(tmp_path: Path) -> None:
    loaded = load_model(make_tiny_model(tmp_path, "llama", with_tokenizer=False))
    assert loaded.tokenizer is None
    assert loaded.task == "text-generation"


def test_fill_mask_and_explicit_task(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "bert", architectures=["BertForMaskedLM"])
    loaded = load_model(path)
    assert loaded.task == "fill-mask"
    assert type(loaded.model).__name__ == "BertForMaskedLM"
    as_encoder = load_model(path, task="feature-extraction")
    assert type(as_encoder.model).__name__ == "BertModel"


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (tf.BertConfig(architectures=["BertModel"]), "feature-extraction"),
        (tf.BertConfig(architectures=["BertForMaskedLM"]), "fill-mask"),
        (tf.BertConfig(architectures=["BertForSequenceClassification"]), "feature-extraction"),
        (tf.RobertaConfig(architectures=["RobertaForMaskedLM"]), "fill-mask"),
        (tf.GPT2Config(architectures=["GPT2LMHeadModel"]), "text-generation"),
        (tf.GPT2Config(architectures=["GPT2Model"]), "feature-extraction"),
        (tf.LlamaConfig(architectures=["LlamaForCausalLM"]), "text-generation"),
        (tf.Qwen2Config(), "text-generation"),  # no architectures: decoder family default
        (tf.MistralConfig(architectures=["MistralForCausalLM"]), "text-generation"),
        (tf.BertConfig(), "feature-extraction"),
    ],
)
def test_infer_task(config: tf.PretrainedConfig, task: str) -> None:
    assert infer_task(config) == task
    assert task in TASKS


@pytest.mark.parametrize(
    ("config", "family"),
    [
        (tf.BertConfig(), "bert"),
        (tf.RobertaConfig(), "bert"),
        (tf.DistilBertConfig(), "bert"),
        (tf.XLMRobertaConfig(), "bert"),
        (tf.MPNetConfig(), "bert"),
        (tf.GPT2Config(), "gpt2"),
        (tf.LlamaConfig(), "llama"),
        (tf.Qwen2Config(), "llama"),
        (tf.MistralConfig(), "llama"),
    ],
)
def test_model_family(config: tf.PretrainedConfig, family: str) -> None:
    assert model_family(config) == family


def test_model_family_unsupported_lists_supported() -> None:
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 't5'.*supported: .*bert.*llama"):
        model_family(tf.T5Config())


# ---------------------------------------------------------------- error cases


def test_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match="does not exist") as exc:
        load_model(missing)
    assert str(missing) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_no_config_json(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "bert")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config.json") as exc:
        load_model(path)
    assert str(path) in str(exc.value)


def test_pickle_only_weights_refused(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "gpt2")
    state = load_model(path).model.state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError, match=r"only pickle weights found \(pytorch_model.bin\).*safetensors only"
    ) as exc:
        load_model(path)
    assert str(path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_no_weights(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "bert")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights found"):
        load_model(path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "llama")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"failed to load 'llama' weights") as exc:
        load_model(path)
    assert str(path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unsupported_model_type(tmp_path: Path) -> None:
    path = tmp_path / "t5"
    tf.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=50).save_pretrained(path)
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 't5'; supported: ") as exc:
        load_model(path)
    assert str(path) in str(exc.value)


def test_task_family_mismatch(tiny_root: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"task 'fill-mask' is not supported for 'gpt2'"):
        load_model(tiny_root / "gpt2", task="fill-mask")


def test_bad_arguments(tiny_root: Path) -> None:
    with pytest.raises(ValueError, match="'translation'"):
        load_model(tiny_root / "bert", task="translation")
    with pytest.raises(ValueError, match="'flash'"):
        load_model(tiny_root / "bert", attn_implementation="flash")


# ---------------------------------------------------------------- save round trip


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_model_round_trip(tiny_root: Path, tmp_path: Path, family: str) -> None:
    loaded = load_model(tiny_root / family)
    # Simulate a stage editing weights in memory (zero one layer's first Linear).
    first_linear = next(m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        first_linear.weight.zero_()
    out = save_model(loaded, tmp_path / "stage")
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    again = load_model(out)
    assert (again.family, again.task, again.model_type) == (loaded.family, loaded.task, loaded.model_type)
    assert again.tokenizer is not None
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        a = loaded.model(input_ids=ids)[0]
        b = again.model(input_ids=ids)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    before = load_model(tiny_root / family)
    with torch.no_grad():
        c = before.model(input_ids=ids)[0]
    assert not torch.equal(a, c)  # the edit really was saved


def test_default_model_path() -> None:
    path = default_model_path()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


@pytest.mark.slow
def test_load_real_minilm() -> None:
    loaded = load_model(default_model_path())
    assert (loaded.family, loaded.task, loaded.model_type) == ("bert", "feature-extraction", "bert")
    assert loaded.tokenizer is not None
    assert loaded.model.config.hidden_size == 384
