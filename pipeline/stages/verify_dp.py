"""verify_dp: audit the DP release of ``private_context``, measure its utility, and gate deployment.

(a) Privacy: a sensitivity search against the bound Δ₂; the exact δ of the noise actually used; a
distinguishing attack on the release with a deliberately broken control (noise redrawn per query) that must
be flagged; the hash of the released state (release file + every target's ONNX) before and after an
adaptive query stream through ONNX Runtime.
(b) Utility on PUBLIC queries (held-out calibration text): the relative error of the DP context attention
against exact attention over the raw context, per replaced head, and of the uniform-attention baseline;
next-token top-1 agreement of each target's ONNX model (before any export: the PyTorch DP model) with the
model that sees the exact context.
(c) Gate: on failure the targets are withdrawn (nothing is published that claims privacy) and the run
fails after the report is written (exit 1), with the measured numbers.

The utility numbers are computed from the private context and are NOT covered by the DP guarantee; they
belong to the provider's report, not to the device bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, text_sets, to_numpy_feeds

__all__ = ["VerifyDPConfig", "run_verify_dp"]


class VerifyDPConfig(StageConfig):
    kind = "verify_dp"
    works_on = "any"
    max_rel_err: float = Field(
        0.1, gt=0, description="gate: mean relative error of DP context attention vs exact must not exceed this"
    )
    min_top1_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="gate: next-token top-1 agreement with the exact-context model (null = report only)",
    )
    samples: int | None = Field(
        None, ge=1, description="held-out passages used as public queries; omitted = calibration.heldout"
    )
    sensitivity_trials: int = Field(2000, ge=16, description="random neighbour pairs in the sensitivity search")
    audit_trials: int = Field(2000, ge=100, description="independent builds per neighbour in the privacy-loss audit")
    audit_repeats: int = Field(
        64, ge=2, description="repeated queries the attacker averages (the broken control redraws noise for each)"
    )
    audit_seed: int | None = Field(
        0,
        description="seed of the privacy-loss audit's own noise draws, which are never released: a seeded PRNG makes"
        " the audit reproducible run to run [I]; null = os.urandom like the release",
    )
    adaptive_queries: int = Field(
        16, ge=1, description="steps of the adaptive query stream before the state hash is re-checked"
    )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@register_stage(VerifyDPConfig)
def run_verify_dp(art: Artifact, cfg: VerifyDPConfig, ctx: StageContext) -> Artifact:
    """Audit the release, measure utility vs exact and uniform attention, and refuse to deploy below the gate."""
    import torch

    from pipeline.privacy.accounting import joint_delta
    from pipeline.privacy.audit import adaptive_stream_unchanged, privacy_loss_audit, sensitivity_search, state_hash
    from pipeline.privacy.model import DPPrefix, QueryRecorder, apply_dp_prefix_, exact_prefix_logits, prefix_cache
    from pipeline.privacy.release import KernelSpec, PublicBounds, exact_attention, exact_sums, uniform_attention
    from pipeline.stages.private_context import _context_ids, read_private_kv

    change = art.torch_changes.get("private_context")
    if not change:
        raise StageError("verify_dp", "no DP release to verify: put a 'private_context' stage before 'verify_dp'")
    release_path = ctx.resolve(change["release"])
    prefix = DPPrefix.load(release_path)
    meta = prefix.meta
    eps, delta = float(meta["epsilon"]), float(meta["delta"])
    layers = sorted(prefix.sums)
    _H_kv, _r, dv1 = prefix.sums[layers[0]].shape
    dv = dv1 - 1
    p = prefix.proj[layers[0]].shape[-1] if prefix.proj else dv
    spec = KernelSpec(p, prefix.degree, prefix.scale)
    bounds = PublicBounds(prefix.key_bound, prefix.value_bound)
    failures: list[dict[str, Any]] = []

    # provider side: the exact context again (for the audit's neighbours and the utility reference)
    plain = _plain(art, ctx)  # exact attention, same weights: the reference
    base = plain.model
    ctx_path = Path(change["context_file"])
    if ctx_path.suffix == ".safetensors":
        kv = read_private_kv(ctx_path, len(layers), "verify_dp: private_context.context_file")
        cache = [(torch.from_numpy(K).float()[None], torch.from_numpy(V).float()[None]) for K, V in kv]
    else:
        ctx_ids = _context_ids(plain, ctx_path, "verify_dp: private_context.context_file")
        cache = prefix_cache(base, ctx_ids)  # (1, H_kv, n, d) per layer, encoded once
        kv = [(k[0].double().numpy(), v[0].double().numpy()) for k, v in cache]
    if kv[0][0].shape[1] != prefix.n:
        raise StageError(
            "verify_dp",
            f"the context file now has {kv[0][0].shape[1]} rows but the release was built from {prefix.n}; re-run private_context",
        )

    # (a) privacy audits
    sens = sensitivity_search(spec, bounds, dv, trials=cfg.sensitivity_trials)
    if sens.ratio > 1 + 1e-9:
        failures.append({"target": "*", "check": "sensitivity", "value": round(sens.ratio, 4), "limit": "≤ 1 (bound)"})
    K0, V0 = kv[layers[0]][0][0], kv[layers[0]][1][0]  # (n, d) layer 0, head 0
    Kp0 = K0 @ prefix.proj[layers[0]][0].astype(np.float64) if prefix.proj else K0
    Ka, Va, Kb, Vb = Kp0.copy(), V0.copy(), Kp0.copy(), V0.copy()
    Ka[0], Va[0], Kb[0], Vb[0] = sens.k, sens.v, sens.k2, sens.v2  # neighbours differing in the worst row found
    S_a, S_b = exact_sums(Ka, Va, spec, bounds), exact_sums(Kb, Vb, spec, bounds)
    sigma = float(meta["sigma"])
    m = int(meta["releases"])
    gaussian = meta["mechanism"] == "feature_sum"
    audit_sigma = sigma if gaussian else float(meta["sensitivity"])  # the control needs some noise scale
    from pipeline.privacy.sampler import SeededSampler

    def audit_sampler():  # one fresh stream per audit: each is reproducible on its own
        return None if cfg.audit_seed is None else SeededSampler(cfg.audit_seed)

    broken = privacy_loss_audit(
        S_a,
        S_b,
        audit_sigma,
        eps,
        delta,
        releases=m,
        trials=cfg.audit_trials,
        repeats=cfg.audit_repeats,
        redraw_per_query=True,
        sampler=audit_sampler(),
    )
    audit: dict[str, Any] = {"max_sensitivity_ratio": float(sens.ratio), "broken_control_flagged": bool(broken.flagged)}
    if gaussian:
        real = privacy_loss_audit(
            S_a,
            S_b,
            sigma,
            eps,
            delta,
            releases=m,
            trials=cfg.audit_trials,
            repeats=cfg.audit_repeats,
            sampler=audit_sampler(),
        )
        exact_d = joint_delta(eps, [sigma] * m, [float(meta["sensitivity"])] * m)
        audit.update(
            {
                "exact_delta": exact_d,
                "epsilon_measured": real.epsilon_measured,
                "epsilon_lower": real.epsilon_lower,
                "broken_epsilon_measured": broken.epsilon_measured,
            }
        )
        if real.flagged:
            failures.append(
                {
                    "target": "*",
                    "check": "privacy_audit",
                    "value": f"ε ≥ {real.epsilon_lower:.3g} measured",
                    "limit": f"ε = {eps:g}",
                }
            )
        if exact_d > delta * (1 + 1e-9):
            failures.append(
                {"target": "*", "check": "exact_delta", "value": f"{exact_d:.3g}", "limit": f"δ = {delta:g}"}
            )
    else:
        audit.update(
            {
                "exact_delta": None,
                "note": "DPTree releases are Laplace under advanced composition; the Gaussian privacy-loss fit does not apply",
            }
        )
    if not broken.flagged:
        failures.append(
            {
                "target": "*",
                "check": "broken_control",
                "value": "not flagged",
                "limit": "the per-query-noise control must be flagged",
            }
        )

    # the DP model as the device runs it: each target's ONNX model, or (no export yet) the PyTorch DP model
    loaded = _plain(art, ctx)
    rec = QueryRecorder()
    apply_dp_prefix_(loaded.model, prefix, recorder=rec)  # the DP model, recording its queries
    runners = {name: _onnx_runner(ctx.resolve(tm.model), tm.io) for name, tm in art.targets.items()} or {
        "pytorch": _torch_runner(loaded.model)
    }

    # adaptive stream: next tokens chosen from the last answer; the released state must not change
    files = [release_path] + [ctx.resolve(tm.model) for tm in art.targets.values()]
    first = next(iter(runners.values()))
    vocab = int(base.config.vocab_size)

    def answer(q: np.ndarray) -> np.ndarray:
        ids = (np.abs(q.astype(np.int64)) % vocab).reshape(1, -1)
        return first({"input_ids": ids, "attention_mask": np.ones_like(ids)})[0, -1, : q.size]

    unchanged, h0, _h1 = adaptive_stream_unchanged(
        lambda: state_hash(
            arrays=[loaded.model.get_buffer(n) for n, _ in loaded.model.named_buffers() if n.endswith("dp_sums")],
            files=files,
        ),
        answer,
        np.arange(1, 9, dtype=np.float32) * 3,
        steps=cfg.adaptive_queries,
    )
    rec.rows.clear()
    audit["state_hash_unchanged"] = bool(unchanged)
    audit["state_hash"] = h0
    if not unchanged:
        failures.append(
            {"target": "*", "check": "state_hash", "value": "changed", "limit": "unchanged after adaptive queries"}
        )

    # (b) utility on public queries
    _, heldout = text_sets(ctx)
    heldout = heldout[: cfg.samples] if cfg.samples else heldout
    batches = encode(
        loaded, heldout, max_length=ctx.run.calibration.max_length, batch_size=ctx.run.calibration.batch_size
    )
    errs: list[float] = []
    uerrs: list[float] = []
    top1: dict[str, list[float]] = {name: [] for name in runners}
    nll: dict[str, list[float]] = {}  # name -> [Σ NLL with the DP model, Σ NLL with the exact context]
    for b in batches:
        rec.rows.clear()
        with torch.no_grad():
            loaded.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        mask = b["attention_mask"].bool().numpy()  # (B, S)
        for layer, q, c in rec.rows:  # q (B, Hq, S, d) raw queries, c (B, Hq, S, dv) DP context part
            K, V = kv[layer]
            G = q.shape[1] // K.shape[0]
            for hq in range(q.shape[1]):
                qq = q[:, hq].double().numpy()[mask]  # (tokens, d)
                ex = exact_attention(qq, K[hq // G], V[hq // G], prefix.scale)
                errs.append(_rel(c[:, hq].double().numpy()[mask], ex))
                uerrs.append(_rel(uniform_attention(V[hq // G], ex.shape[:-1]), ex))
        ref = exact_prefix_logits(base, None, b, cache).numpy()  # (B, S, V) with the exact context
        for name, fn in runners.items():
            out = fn(b)
            top1[name].append(float((out.argmax(-1) == ref.argmax(-1))[mask].mean()))
            nll[name] = [a + c for a, c in zip(nll.get(name, [0.0, 0.0]), (_nll(out, b), _nll(ref, b)))]
    rel_err, uni = float(np.mean(errs)), float(np.mean(uerrs))
    agreement = {k: float(np.mean(v)) for k, v in top1.items()}
    t1 = min(agreement.values())
    ppl_ratio = {k: float(np.exp((a - c) / max(_ntok(batches), 1))) for k, (a, c) in nll.items()}
    utility = {
        "rel_err": rel_err,
        "uniform_rel_err": uni,
        "top1_agreement": t1,
        "rel_err_worst_head": float(np.max(errs)),
        "ppl_ratio": ppl_ratio,
        "top1_per_target": agreement,
        "queries": int(sum(int(b["attention_mask"].sum()) for b in batches)),
    }

    # (c) gate
    if rel_err > cfg.max_rel_err:
        failures.append(
            {"target": "*", "check": "dp_rel_err", "value": round(rel_err, 4), "limit": f"≤ {cfg.max_rel_err}"}
        )
    if rel_err >= uni:
        failures.append(
            {
                "target": "*",
                "check": "dp_vs_uniform",
                "value": round(rel_err, 4),
                "limit": f"< uniform-attention error {uni:.4g}",
            }
        )
    if cfg.min_top1_agreement is not None and t1 < cfg.min_top1_agreement:
        failures.append(
            {"target": "*", "check": "dp_top1_agreement", "value": round(t1, 4), "limit": f"≥ {cfg.min_top1_agreement}"}
        )
    gate = "refuse" if failures else "pass"
    limits = {"max_rel_err": cfg.max_rel_err, "min_top1_agreement": cfg.min_top1_agreement}
    ctx.metrics.update({"audit": audit, "utility": utility, "gate": gate, "limits": limits, "failures": failures})
    if failures:
        ctx.log.error(
            "verify_dp refuses to deploy: %s",
            "; ".join(f"{f['check']} {f['value']} (limit {f['limit']})" for f in failures),
        )
        return art.replace(targets={})  # nothing that claims privacy gets published
    return art


def _nll(logits: np.ndarray, batch: dict) -> float:
    """Σ next-token negative log-likelihood over the batch's valid positions (B, S, V) logits."""
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["attention_mask"]).astype(bool)
    lg = logits[:, :-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    tok = np.take_along_axis(lg, ids[:, 1:, None], axis=-1)[..., 0]
    valid = mask[:, 1:] & mask[:, :-1]
    return float((lse - tok)[valid].sum())


def _ntok(batches: list) -> int:
    return int(
        sum((np.asarray(b["attention_mask"])[:, 1:] & np.asarray(b["attention_mask"])[:, :-1]).sum() for b in batches)
    )


def _onnx_runner(path: Path, io: Any):
    from runtimes.session import make_session

    sess = make_session(path, threads=1)
    return lambda batch: sess.run([io["output_names"][0]], to_numpy_feeds(batch, io))[0]


def _torch_runner(model: Any):
    import torch

    def run(batch: dict) -> np.ndarray:
        t = {k: torch.as_tensor(np.asarray(batch[k])) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return model(**t).logits.numpy()

    return run


def _plain(art: Artifact, ctx: StageContext):
    """The current model without the DP rewrite (pruned/recovered weights, exact attention)."""
    from pipeline.models import load_model
    from pipeline.stages._common import model_path

    return load_model(model_path(art, ctx), art.task)
