"""private_context: build (ε, δ)-DP releases of a decoder's private prefix and rewrite its attention to use them.

Provider side: the exact model runs over the private context (a text file, or precomputed per-layer
key/value tensors) and, for every layer and KV head, the noisy feature sums S̃ = Σ φ(Pᵀk)[vᵀ, 1] + N(0, σ²)
are released once (pipeline.privacy). The PyTorch model's attention layers are rewritten to combine the
exact self part of the softmax with the DP estimate of the context part; the ``export`` stage then compiles
that into each target's ONNX model, which carries only S̃ (and the public projection P).

Guarantee (stated in the metrics): (ε, δ)-DP with respect to replacing ONE context row — the key/value of
one context position in every replaced layer and head at once — under the public bounds ‖Pᵀk‖∞ ≤ R and
|v| ≤ R_w (enforced by clipping inside the mechanism). A document of g tokens is protected only through
group privacy: (gε, g·e^{(g−1)ε}·δ). In a multi-layer decoder a token also shapes the keys of later
positions in deeper layers, so per-token privacy holds exactly only where one token drives one row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.artifact import Artifact
from pipeline.errors import ConfigError, StageError
from pipeline.loaded import is_causal_lm
from pipeline.stage import RunPlan, StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_from_artifact, text_sets

__all__ = ["PrivateContextConfig", "guarantee_text", "read_private_kv", "run_private_context"]

Bound = float | Literal["calibration"]


class PrivateContextConfig(StageConfig):
    kind = "private_context"
    works_on = "torch"
    path_fields = ("context_file",)
    context_file: str | None = Field(
        None,
        description="required: the private context, a UTF-8 text file (the decoder's prefix) or a .safetensors file of per-layer 'layers.{l}.key'/'layers.{l}.value' tensors (H_kv, n, head_dim)",
    )
    epsilon: float = Field(1.0, gt=0, allow_inf_nan=False, description="total ε over all replaced heads and layers")
    delta: float = Field(1e-5, gt=0, lt=1, description="total δ")
    key_bound: Bound | None = Field(
        None,
        description="required: public R: |key entry| ≤ R after projection (keys are clipped to it); 'calibration' = the largest entry on the public calibration text",
    )
    value_bound: Bound | None = Field(
        None, description="required: public R_w: |value entry| ≤ R_w (values are clipped to it); 'calibration' as above"
    )
    degree: int = Field(4, ge=1, le=16, description="polynomial degree s of the exp kernel features")
    projection_dim: int | None = Field(
        None,
        ge=1,
        description="project q/k to this many dimensions per head, fitted on the public calibration text (omitted = full head dimension)",
    )
    accounting: Literal["gaussian_joint", "basic"] = Field(
        "gaussian_joint", description="composition over heads/layers: exact joint Gaussian, or basic (ε/m, δ/m) each"
    )
    mechanism: Literal["feature_sum", "dptree"] = Field(
        "feature_sum",
        description="noisy feature sums (Gaussian) or the DPTree structures (Laplace, advanced composition)",
    )
    max_release_mb: float = Field(
        256.0, gt=0, description="refuse releases larger than this (float32 MB over all heads)"
    )

    def check(self, plan: RunPlan) -> None:
        """Before anything runs (``edgepipe validate`` too): the required keys, the privacy parameters, a file to
        read, and a causal decoder to rewrite."""
        from pipeline.privacy.calibration import check_privacy_params

        if self.context_file is None:
            raise ValueError("context_file is missing: give the private context (a text or .safetensors file)")
        if not Path(self.context_file).is_file():
            raise ValueError(f"context_file: '{self.context_file}' is not a file")
        try:
            check_privacy_params(
                self.epsilon,
                self.delta,
                1.0 if self.key_bound == "calibration" else self.key_bound,
                1.0 if self.value_bound == "calibration" else self.value_bound,
                where="private_context",
            )
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("private_context: ").removeprefix("private_context")) from None
        if not is_causal_lm(plan.family, plan.task):
            raise ValueError(
                f"needs a decoder for text-generation (GPT-2 / Llama family), got {plan.family} ({plan.task})"
            )


def guarantee_text(eps: float, delta: float, R: float, Rw: float, proj: bool) -> str:
    k = "‖Pᵀk‖∞" if proj else "‖k‖∞"
    return (
        f"({eps:g}, {delta:g})-DP for replacing one context row (the key/value of one context position in every replaced "
        f"layer and head), under the public bounds {k} ≤ {R:.4g} and |v| ≤ {Rw:.4g} enforced by clipping; n is public. "
        f"Documents of g rows only via group privacy: (g·ε, g·e^((g−1)ε)·δ). Deeper decoder layers mix positions, so one "
        f"token can move many rows there: per-token privacy holds exactly only where one token drives one row."
    )


def read_private_kv(path: Path, n_layers: int, where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-layer (K, V) (H_kv, n, d) float64 from a .safetensors file, checked (shapes, finite)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            names = set(fh.keys())
            out = []
            for l in range(n_layers):
                kn, vn = f"layers.{l}.key", f"layers.{l}.value"
                if kn not in names or vn not in names:
                    raise ConfigError(
                        f"{where}: {path.name} has no '{kn}'/'{vn}' (needs one pair per layer, {n_layers} layers)"
                    )
                K, V = fh.get_tensor(kn).astype(np.float64), fh.get_tensor(vn).astype(np.float64)
                if K.ndim != 3 or K.shape[:2] != V.shape[:2]:
                    raise ConfigError(
                        f"{where}: {path.name}: layer {l} key {K.shape} / value {V.shape} are not (H_kv, n, d) with matching H_kv, n"
                    )
                if not (np.isfinite(K).all() and np.isfinite(V).all()):
                    raise ConfigError(f"{where}: {path.name}: layer {l} has non-finite entries")
                out.append((K, V))
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{where}: cannot read {path.name} as safetensors: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    return out


def _context_ids(loaded: Any, path: Path, where: str) -> Any:
    import torch

    from pipeline.data import hash_token_ids

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read '{path}' as UTF-8 text: {type(exc).__name__}") from None
    if not text.strip():
        raise ConfigError(f"{where}: '{path}' is empty")
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = hash_token_ids(text, int(loaded.model.config.vocab_size))
    return torch.tensor(ids, dtype=torch.long)


def _bound(value: Bound, public: float, name: str) -> float:
    if value == "calibration":
        if not (math.isfinite(public) and public > 0):
            raise StageError(
                "private_context", f"{name}: the public calibration text gave {public}, not a usable bound"
            )
        return float(public)
    return float(value)


@register_stage(PrivateContextConfig)
def run_private_context(art: Artifact, cfg: PrivateContextConfig, ctx: StageContext) -> Artifact:
    """Release DP feature sums of the private prefix per layer/KV head and rewrite the decoder's attention."""
    from pipeline.privacy.calibration import check_privacy_params
    from pipeline.privacy.dptree import DPTreeSoftmax
    from pipeline.privacy.model import DPPrefix, apply_dp_prefix_, context_kv, fit_projection, public_kv
    from pipeline.privacy.release import KernelSpec, PublicBounds, noisy_layer_sums, replace_one_sensitivity
    from pipeline.privacy.sampler import SecureSampler

    where = f"stages[{ctx.index}].private_context"
    # required keys are checked here, first (stage configs keep defaults so every kind builds with no arguments)
    if cfg.context_file is None:
        raise ConfigError(f"{where}: context_file is missing: give the private context (a text or .safetensors file)")
    check_privacy_params(
        cfg.epsilon,
        cfg.delta,
        1.0 if cfg.key_bound == "calibration" else cfg.key_bound,
        1.0 if cfg.value_bound == "calibration" else cfg.value_bound,
        where=where,
    )
    if not is_causal_lm(art.family, art.task):
        raise StageError(
            "private_context",
            f"needs a decoder for text-generation (GPT-2 / Llama family), got {art.family} ({art.task})",
        )
    if art.torch_changes.get("attention") or art.torch_changes.get("private_context"):
        raise StageError(
            "private_context",
            "the attention is already rewritten by an earlier stage; put private_context first and only once",
        )
    path = Path(cfg.context_file)
    if not path.is_file():
        raise ConfigError(f"{where}.context_file: '{path}' is not a file")
    loaded = load_from_artifact(art, ctx)
    model = loaded.model
    conf = model.config
    n_layers = int(getattr(conf, "num_hidden_layers", None) or conf.n_layer)

    # provider side: the exact context keys/values (never written anywhere)
    if path.suffix == ".safetensors":
        kv = read_private_kv(path, n_layers, f"{where}.context_file")
    else:
        ids = _context_ids(loaded, path, f"{where}.context_file")
        max_pos = int(getattr(conf, "n_positions", None) or getattr(conf, "max_position_embeddings", 0) or 0)
        if max_pos and len(ids) + ctx.run.calibration.max_length > max_pos:
            raise StageError(
                "private_context",
                f"context of {len(ids)} tokens + calibration.max_length {ctx.run.calibration.max_length} exceeds the model's {max_pos} positions",
            )
        kv = context_kv(model, ids)
    H_kv, n, d = kv[0][0].shape
    dv = kv[0][1].shape[-1]
    if any(K.shape != (H_kv, n, d) or V.shape != (H_kv, n, dv) for K, V in kv):
        raise ConfigError(f"{where}.context_file: layers disagree in (H_kv, n, d)")
    mods_heads = int(
        getattr(conf, "num_key_value_heads", None) or getattr(conf, "num_attention_heads", None) or conf.n_head
    )
    if H_kv != mods_heads:
        raise ConfigError(f"{where}.context_file: {H_kv} KV heads per layer, the model has {mods_heads}")

    # public side: calibration text -> projection and (optionally) bounds
    calib, _ = text_sets(ctx)
    batches = encode(
        loaded, calib, max_length=ctx.run.calibration.max_length, batch_size=ctx.run.calibration.batch_size
    )
    pub = public_kv(model, batches)
    p = cfg.projection_dim or d
    if p > d:
        raise ConfigError(f"{where}.projection_dim: {p} exceeds the head dimension {d}")
    proj = {l: fit_projection(pub[l][0], p) for l in range(n_layers)} if cfg.projection_dim else {}
    pub_keys = max(
        float(np.abs(np.einsum("hmd,hdp->hmp", K, proj[l]) if proj else K).max()) for l, (K, _) in enumerate(pub)
    )
    assert cfg.key_bound is not None and cfg.value_bound is not None  # check() requires both
    R = _bound(cfg.key_bound, pub_keys, "key_bound")
    Rw = _bound(cfg.value_bound, max(float(np.abs(V).max()) for _, V in pub), "value_bound")
    bounds = PublicBounds(R, Rw)
    scale = 1.0 / math.sqrt(d)
    spec = KernelSpec(p, cfg.degree, scale)
    m = n_layers * H_kv
    size_mb = m * spec.r * (dv + 1) * 4 / 1e6
    if size_mb > cfg.max_release_mb:
        raise StageError(
            "private_context",
            f"release would be {size_mb:.0f} MB ({spec.r} features × {dv + 1} columns × {m} heads) > max_release_mb {cfg.max_release_mb:g}; lower degree or set projection_dim",
        )

    delta_f = replace_one_sensitivity(spec, bounds, dv)
    sampler = SecureSampler()
    sums: dict[int, np.ndarray] = {}
    if cfg.mechanism == "feature_sum":
        sums, plan = noisy_layer_sums(
            kv,
            spec,
            bounds,
            epsilon=cfg.epsilon,
            delta=cfg.delta,
            accounting=cfg.accounting,
            proj=proj,
            sampler=sampler,
        )
        sigma, exact_delta = plan.sigmas[0], plan.exact_delta
    else:
        for l, (K, V) in enumerate(kv):
            Kp = np.einsum("hnd,hdp->hnp", K, proj[l]) if proj else K  # (H_kv, n, p)
            trees = [
                DPTreeSoftmax(Kp[h], V[h], spec, bounds, cfg.epsilon, cfg.delta, releases=m, sampler=sampler)
                for h in range(H_kv)
            ]
            sums[l] = np.stack([t.effective_sums() for t in trees]).astype(np.float32)
    del kv
    if cfg.mechanism == "dptree":
        b = trees[0].dist.T_S.scale
        sigma, exact_delta = (
            float(math.sqrt(2) * b),
            float(cfg.delta),
        )  # per-entry std in units of X_j; δ from advanced composition
    meta = {
        "epsilon": cfg.epsilon,
        "delta": cfg.delta,
        "accounting": cfg.accounting if cfg.mechanism == "feature_sum" else "advanced_composition",
        "mechanism": cfg.mechanism,
        "sigma": float(sigma),
        "sensitivity": float(delta_f),
        "releases": m,
        "exact_delta": float(exact_delta),
        "sampler": sampler.name,
        "features": spec.r,
    }
    prefix = DPPrefix(
        n=int(n),
        degree=cfg.degree,
        scale=scale,
        key_bound=R,
        value_bound=Rw,
        sums=sums,
        proj={l: P.astype(np.float32) for l, P in proj.items()},
        meta=meta,
    )
    release_path = ctx.dir / "dp_release.safetensors"
    prefix.save(release_path)
    replaced = apply_dp_prefix_(
        model, DPPrefix.load(release_path)
    )  # the check that the saved release rewrites the model
    ctx.metrics.update(
        {
            "epsilon": cfg.epsilon,
            "delta": cfg.delta,
            "sigma": float(sigma),
            "accounting": meta["accounting"],
            "heads_replaced": int(m),
            "context_tokens": int(n),
            "bytes_shipped": prefix.nbytes,
            "layers_replaced": replaced,
            "mechanism": cfg.mechanism,
            "exact_delta": float(exact_delta),
            "sensitivity": float(delta_f),
            "features": spec.r,
            "key_bound": R,
            "value_bound": Rw,
            "sampler": sampler.name,
            "raw_context_bytes": int(m * n * (d + dv) * 4),
            "guarantee": guarantee_text(cfg.epsilon, cfg.delta, R, Rw, bool(proj)),
        }
    )
    change = {
        "release": ctx.ref(release_path),
        "context_file": str(path.resolve()),
        "mechanism": cfg.mechanism,
        "projection_dim": cfg.projection_dim,
    }
    return art.replace(torch_changes={**dict(art.torch_changes), "private_context": change})
