"""private_context + export + verify_dp end to end: the pass in the usable region (synthetic low-dimension
decoder), the refusal on a real head (exit 1, nothing published), config errors, and the search for raw
context in every artifact file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import parse_config
from pipeline.errors import ConfigError, ValidationFailed
from tests.pipeline.privacy.synth import corpus_words, make_low_dim_gpt2

CONTRACT = {
    "private_context": {"epsilon", "delta", "sigma", "accounting", "heads_replaced", "context_tokens", "bytes_shipped"},
}


def _texts(tmp: Path, n_ctx: int, seed: int = 0) -> tuple[Path, Path, str]:
    rng = np.random.default_rng(seed)
    words = corpus_words()
    ctx_text = " ".join(rng.choice(words, n_ctx))
    ctx = tmp / "private.txt"
    ctx.write_text(ctx_text)
    cal = tmp / "public.txt"
    cal.write_text("\n".join(" ".join(rng.choice(words, 24)) for _ in range(24)))
    return ctx, cal, ctx_text


def _config(model: Path, ctx: Path, cal: Path, export: bool = True, **pc) -> dict:
    return {
        "model": {"path": str(model)},
        "targets": ["host-cpu"],
        "calibration": {"file": str(cal), "samples": 12, "heldout": 6, "max_length": 24, "batch_size": 6},
        "stages": [
            {
                "private_context": {
                    "context_file": str(ctx),
                    "key_bound": "calibration",
                    "value_bound": "calibration",
                    **pc,
                }
            },
            *([{"export": {"with_past": False}}] if export else []),
            {"verify_dp": {"audit_trials": 400, "sensitivity_trials": 400, "adaptive_queries": 8}},
        ],
    }


def _needles(text: str, ids: list[int], kv) -> dict[str, bytes]:
    """Byte patterns of the raw context: its text, token id runs, and key/value rows (float32 and float64)."""
    out = {"text": text[:64].encode(), "text_tail": text[-48:].encode()}
    for dt in (np.int64, np.int32):
        out[f"ids_{np.dtype(dt).name}"] = np.asarray(ids[5:21], dtype=dt).tobytes()
    for l, (K, V) in enumerate(kv):
        for h in range(K.shape[0]):
            for i in (0, 1, K.shape[1] // 2, K.shape[1] - 1):
                for name, M in (("key", K), ("value", V)):
                    for dt in (np.float32, np.float64):
                        out[f"{name}{l}.{h}.{i}.{np.dtype(dt).name}"] = np.asarray(M[h, i], dtype=dt).tobytes()
    return out


def _search(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        data = f.read_bytes()
        hits += [f"{f.relative_to(root)}: {k}" for k, v in needles.items() if v in data]
    return hits


def test_private_context_config_errors_are_one_line(tmp_path):
    base = {
        "targets": ["host-cpu"],
        "stages": [{"private_context": {"context_file": "x.txt", "key_bound": 1.0, "value_bound": 1.0}}],
    }
    parse_config(base)  # valid
    for change, needle in (
        ({"epsilon": 0}, "epsilon"),
        ({"epsilon": -2.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"degree": 0}, "degree"),
        ({"noise": 1}, "unknown key 'noise'"),
    ):
        bad = {**base, "stages": [{"private_context": {**base["stages"][0]["private_context"], **change}}]}
        with pytest.raises(ConfigError) as ei:
            parse_config(bad)
        assert needle in str(ei.value) and "stages[0].private_context" in str(ei.value) and "\n" not in str(ei.value)


def test_missing_bounds_or_context_are_refused_before_anything_runs(tiny_models, tmp_path):
    from pipeline.runner import run

    ctx, cal, _ = _texts(tmp_path, 20)
    for body, needle in (
        ({"context_file": str(ctx), "value_bound": 1.0}, "stages[0].private_context: key_bound is missing"),
        ({"context_file": str(ctx), "key_bound": 1.0}, "stages[0].private_context: value_bound is missing"),
        ({"key_bound": 1.0, "value_bound": 1.0}, "stages[0].private_context: context_file is missing"),
        ({"context_file": str(tmp_path / "nope.txt"), "key_bound": 1.0, "value_bound": 1.0}, "context_file: '"),
    ):
        cfg = {
            "model": {"path": str(tiny_models["gpt2"])},
            "targets": ["host-cpu"],
            "stages": [{"private_context": body}],
            "calibration": {"file": str(cal), "samples": 12, "heldout": 6},
        }
        with pytest.raises(ConfigError) as ei:
            run(cfg, workdir=tmp_path / "run", progress=False)
        assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_usable_region_passes_end_to_end_and_ships_no_raw_context(tmp_path):
    """Synthetic decoder with head dim 2, n = 8192 context tokens, ε = 16: verify_dp passes, the ONNX model
    matches the PyTorch DP model, and no file of the run holds the raw context."""
    import torch

    from pipeline.models import load_model
    from pipeline.privacy.model import DPPrefix, apply_dp_prefix_, context_kv
    from pipeline.runner import run
    from pipeline.stages._common import to_numpy_feeds
    from runtimes.session import make_session

    model = make_low_dim_gpt2(tmp_path / "m", n_positions=8192 + 64)
    ctx, cal, text = _texts(tmp_path, 8192)
    work = tmp_path / "run"
    rep = run(_config(model, ctx, cal, epsilon=16.0, degree=4), workdir=work, progress=False)
    stages = {s["name"]: s["metrics"] for s in rep["stages"]}
    pc, vd = stages["private_context"], stages["verify_dp"]
    assert CONTRACT["private_context"] <= set(pc)
    assert pc["context_tokens"] == 8192 and pc["heads_replaced"] == 4 and pc["epsilon"] == 16.0
    assert pc["bytes_shipped"] == 4 * 15 * 3 * 4  # 4 heads × C(2+4, 4) features × (d_v + 1) columns × float32
    assert set(vd) >= {"audit", "utility", "gate"}
    assert set(vd["audit"]) >= {"max_sensitivity_ratio", "broken_control_flagged", "state_hash_unchanged"}
    assert set(vd["utility"]) >= {"rel_err", "uniform_rel_err", "top1_agreement"}
    assert vd["gate"] == "pass" and rep["ok"], vd
    assert vd["audit"]["broken_control_flagged"] and vd["audit"]["state_hash_unchanged"]
    assert vd["audit"]["max_sensitivity_ratio"] <= 1.0
    assert vd["utility"]["rel_err"] < 0.1 < vd["utility"]["uniform_rel_err"]
    assert vd["utility"]["top1_agreement"] > 0.9
    assert 0.8 < vd["utility"]["ppl_ratio"]["host-cpu"] < 1.25
    # report.md: the guarantee, what ships, the audits, utility vs the uniform baseline and the gate
    md = (work / "report.md").read_text()
    pc_md, vd_md = md.split("### private_context", 1)[1], md.split("### verify_dp", 1)[1]
    assert pc["guarantee"] in pc_md and f"ships: {pc['bytes_shipped']} bytes" in pc_md
    assert "8192 tokens; 4 heads" in pc_md and f"ε = {pc['epsilon']:g}" in pc_md
    assert "gate: **pass**" in vd_md
    assert f"| {vd['utility']['rel_err']:.3g} (" in vd_md and f"| {vd['utility']['uniform_rel_err']:.3g} |" in vd_md
    assert "| broken control (noise redrawn per query) flagged | yes |" in vd_md
    assert f"| worst sensitivity found / bound | {vd['audit']['max_sensitivity_ratio']:.3g}" in vd_md
    published = work / "host-cpu" / "model.onnx"
    assert published.is_file()
    # ONNX parity with the PyTorch DP model (fresh model + the saved release)
    assert stages["export"]["exports"]["opset18"]["max_abs_diff_vs_torch"] < 1e-4
    loaded = load_model(model)
    rel = next(work.glob("stages/*private_context/dp_release.safetensors"))
    apply_dp_prefix_(loaded.model, DPPrefix.load(rel))
    ids = np.array([[5, 9, 11, 3, 7, 2, 8], [4, 4, 6, 1, 0, 0, 0]], dtype=np.int64)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], dtype=np.int64)
    io = {"input_names": ["input_ids", "attention_mask", "position_ids"]}
    feeds = to_numpy_feeds({"input_ids": ids, "attention_mask": mask}, io)
    got = make_session(published).run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = loaded.model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(got - ref)[mask.astype(bool)].max() < 1e-4
    # no raw context key, value, token or text in any file of the run
    plain = load_model(model)
    ctx_ids = plain.tokenizer(text, add_special_tokens=False)["input_ids"]
    kv = context_kv(plain.model, torch.tensor(ctx_ids))
    needles = _needles(text, ctx_ids, kv)
    assert _search(work, needles) == []
    # positive control: the search finds the same patterns when they are there
    leak = tmp_path / "leak"
    leak.mkdir()
    (leak / "x.bin").write_bytes(b"pad" + needles["key0.1.1.float32"] + needles["ids_int64"] + needles["text"])
    assert len(_search(leak, needles)) >= 3


def test_refusal_on_a_real_head_exits_1_and_publishes_nothing(tiny_models, tmp_path):
    """A tiny GPT-2 (head dim 8, 2 layers × 4 heads) at ε = 1 with 600 context tokens: the release is swamped
    by noise; verify_dp (on the PyTorch DP model: no export, to keep the test short) must refuse with the
    measured numbers and exit 1, publishing nothing."""
    from pipeline.cli import main

    ctx, cal, _ = _texts(tmp_path, 60)
    cfg = _config(tiny_models["gpt2"], ctx, cal, export=False, epsilon=1.0, degree=2)
    cfg_path = tmp_path / "dp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "run"
    code = main(["run", str(cfg_path), "--workdir", str(work), "--quiet"])
    assert code == 1
    rep = json.loads((work / "report.json").read_text())
    vd = next(s["metrics"] for s in rep["stages"] if s["name"] == "verify_dp")
    assert vd["gate"] == "refuse" and not rep["ok"]
    assert vd["utility"]["rel_err"] > 0.1 or vd["utility"]["rel_err"] >= vd["utility"]["uniform_rel_err"]
    assert {f["check"] for f in rep["failures"]} & {"dp_rel_err", "dp_vs_uniform"}
    assert not (work / "host-cpu").exists() and rep["targets"] == {}
    md = (work / "report.md").read_text().split("### verify_dp", 1)[1]
    assert "gate: **refuse** — targets withdrawn" in md and f"| {vd['utility']['rel_err']:.3g} (" in md
    assert vd["utility"]["top1_per_target"].keys() == {"pytorch"}


def test_precomputed_key_value_context_and_its_errors(tiny_models, tmp_path):
    """context_file may be a .safetensors of per-layer keys/values; a file missing a layer is one ConfigError."""
    import torch
    from safetensors.numpy import save_file

    from pipeline.models import load_model
    from pipeline.privacy.model import context_kv
    from pipeline.runner import run

    loaded = load_model(tiny_models["llama"])
    kv = context_kv(loaded.model, torch.arange(3, 40))
    tensors = {}
    for l, (K, V) in enumerate(kv):
        tensors[f"layers.{l}.key"], tensors[f"layers.{l}.value"] = K.astype(np.float32), V.astype(np.float32)
    good = tmp_path / "kv.safetensors"
    save_file(tensors, str(good))
    _, cal, _ = _texts(tmp_path, 10)
    cfg = _config(
        tiny_models["llama"], good, cal, export=False, key_bound=2.0, value_bound=2.0, degree=2, accounting="basic"
    )
    try:  # private_context + verify_dp on the PyTorch DP model (GQA, precomputed context): pass or refuse
        run(cfg, workdir=tmp_path / "run", progress=False)
    except ValidationFailed:
        pass
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    pc = rep["stages"][0]["metrics"]
    vd = rep["stages"][1]["metrics"]
    assert vd["gate"] in ("pass", "refuse") and 0 <= vd["utility"]["top1_agreement"] <= 1
    assert vd["audit"]["broken_control_flagged"] and vd["audit"]["max_sensitivity_ratio"] <= 1
    assert (
        pc["context_tokens"] == 37 and pc["heads_replaced"] == 2 * 2 and pc["accounting"] == "basic"
    )  # 2 layers × 2 KV heads (GQA)
    assert pc["bytes_shipped"] == 4 * 45 * 9 * 4  # C(8+2, 2) = 45 features × (8 + 1) columns per KV head
    # the DPTree mechanism: same shapes, Laplace under advanced composition, far more noise
    cfg3 = _config(
        tiny_models["llama"], good, cal, export=False, key_bound=2.0, value_bound=2.0, degree=2, mechanism="dptree"
    )
    cfg3["stages"] = cfg3["stages"][:1]
    rep3 = run(cfg3, workdir=tmp_path / "run3", progress=False)
    pc3 = rep3["stages"][0]["metrics"]
    assert pc3["accounting"] == "advanced_composition" and pc3["bytes_shipped"] == pc["bytes_shipped"]
    assert pc3["sigma"] > pc["sigma"]
    tensors.pop("layers.1.value")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    cfg2 = _config(tiny_models["llama"], bad, cal, export=False, key_bound=2.0, value_bound=2.0, degree=2)
    cfg2["stages"] = cfg2["stages"][:1]
    with pytest.raises(ConfigError, match=r"context_file: bad.safetensors has no 'layers.1.key'/'layers.1.value'"):
        run(cfg2, workdir=tmp_path / "run2", progress=False)


@pytest.mark.parametrize(
    "stage, fragment",
    [
        ({"epsilon": 1.0}, "context_file is missing"),
        ({"context_file": "context.txt", "value_bound": 1.0}, "key_bound is missing"),
        ({"context_file": "context.txt", "key_bound": 1.0, "value_bound": 1.0, "epsilon": 0.0}, "epsilon"),
        ({"context_file": "context.txt", "key_bound": 1.0, "value_bound": 1.0}, "needs a decoder for text-generation"),
    ],
)
def test_validate_refuses_what_private_context_would_refuse(tmp_path, capsys, stage, fragment):
    """`edgepipe validate` runs the same checks as the stage (packaged MiniLM: an encoder, so no decoder to rewrite)."""
    import yaml

    from pipeline.cli import main

    (tmp_path / "context.txt").write_text("the private prefix\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"targets": ["host-cpu"], "stages": [{"private_context": stage}, {"export": {}}]}))
    assert main(["validate", str(cfg)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "stages[0].private_context" in line and fragment in line
