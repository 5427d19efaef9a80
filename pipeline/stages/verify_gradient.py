"""verify_gradient: certify the gradients of the model as it stands, measure beta per head, and where the
almost-linear method applies, compute its gradient at a long sequence length against exact autograd.

(a) The current model (with its recorded attention swap: flash, small-cache or block-sparse kernels; pruned or
narrowed weights) against a float64 exact reference (torch's dense attention; dense attention under the same
block mask for block-sparse), per transformer layer, on calibration passages. A layer over ``max_rel_err`` is
a recorded gate failure naming the layer (the run fails after its report is written, like ``validate``).
(b) beta = max |q.k| / sqrt(d) and its 99th percentile per head on calibration text; the degree for kernel
error ``kernel_eps`` (Alman & Song 2023, arXiv 2302.13214), its feature count, and whether the method applies.
(c) If any head applies: the model's gradient at ``seq_len`` tokens with polynomial-feature attention on those
heads (factorized backward, pipeline.lowrank) vs exact float64 autograd: relative error and both times.

A bounded-entry model (``pipeline.lowrank.bounded``: config.json records its logit cap) is certified as it computes:
normalized q / k and the cap as the logit scale on every path, so beta is measured on the bounded logits.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from pipeline.artifact import Artifact
from pipeline.errors import StageError
from pipeline.stage import StageConfig, StageContext, register_stage
from pipeline.stages._common import encode, load_from_artifact, text_sets

__all__ = ["VerifyGradientConfig", "run_verify_gradient"]


class VerifyGradientConfig(StageConfig):
    kind = "verify_gradient"
    works_on = "any"  # reads the PyTorch model as it stands; changes nothing
    samples: int = Field(4, ge=1, le=256, description="calibration passages for the gradient check and the beta probe")
    max_rel_err: float = Field(
        1e-4, gt=0, description="gate: per-layer relative gradient error vs float64 exact autograd"
    )
    kernel_eps: float = Field(
        1e-4, gt=0, lt=1, description="kernel relative error the polynomial degree is chosen for (Taylor bound)"
    )
    max_features: int | None = Field(
        None,
        ge=1,
        description="a head applies when its feature count k <= this; omitted = seq_len / head_dim (then the"
        " factorized gradient's O(N k D^2) cost is below exact O(N^2 D))",
    )
    fast_gradient: bool = Field(True, description="compute the almost-linear gradient at seq_len where heads apply")
    seq_len: int = Field(
        4096, ge=16, le=65536, description="tokens of the fast-gradient check (capped by the model's positions)"
    )
    max_fast_rel_err: float = Field(
        1e-3, gt=0, description="gate: relative error of the fast gradient vs exact autograd"
    )
    timing_repeats: int = Field(
        2, ge=1, le=10, description="fast and exact gradients are timed this many times, interleaved; the best counts"
    )


def _load64(art: Artifact, ctx: StageContext, *, reference: bool):
    loaded = load_from_artifact(art, ctx, reference=reference)
    loaded.model.double()
    return loaded


def _reapply_swap(model, record: dict, kernel: str | None = None) -> int:
    """Re-apply the recorded attention swap (``kernel`` overrides, e.g. "naive" for the dense oracle)."""
    from pipeline.kernels.change import AttentionChange, apply_attention_change

    return apply_attention_change(model, AttentionChange.from_record(record), kernel=kernel)


def _is_block_sparse(record: dict | None) -> bool:
    from pipeline.kernels.change import AttentionChange

    return record is not None and bool(record) and AttentionChange.from_record(record).block_sparse


def _long_ids(loaded, texts: list[str], n: int, seed: int):
    """(1, n) token ids: the calibration passages' tokens, concatenated and repeated to n."""
    import torch

    tok = loaded.tokenizer
    stream: list[int] = []
    if tok is not None:
        for t in texts:
            stream.extend(tok(t, add_special_tokens=False)["input_ids"])
    if not stream:
        vocab = int(loaded.model.config.vocab_size)
        stream = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    reps = -(-n // len(stream))
    ids = torch.tensor((stream * reps)[:n], dtype=torch.long)[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _max_positions(conf: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(conf, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _grad_vector(model) -> Any:
    import torch

    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _timed_grad(model, batch, seed: int) -> tuple[Any, float]:
    """(flattened parameter gradient, seconds of forward + backward)."""
    from pipeline.lowrank.certify import projection_loss

    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    projection_loss(model, batch, seed=seed).backward()
    seconds = time.perf_counter() - t0
    return _grad_vector(model), seconds


@register_stage(VerifyGradientConfig)
def run_verify_gradient(art: Artifact, cfg: VerifyGradientConfig, ctx: StageContext) -> Artifact:
    """Certify kernel gradients per layer, report beta and applicability per head, time the fast gradient."""
    import torch

    from pipeline.kernels import swap_attention_
    from pipeline.lowrank.bounded import bounded_beta, route_bounded_
    from pipeline.lowrank.certify import (
        BetaProbe,
        LowRankHeads,
        compare_layer_gradients,
        head_applicability,
        install_attention_probe,
    )

    change = art.torch_changes.get("attention")
    block_sparse = _is_block_sparse(change)
    calib, _ = text_sets(ctx)
    seed = ctx.run.seed
    failures: list[dict[str, Any]] = []

    # (a) kernel gradients: the model as it stands vs the float64 exact reference, per layer
    cand = _load64(art, ctx, reference=False)
    cap = bounded_beta(cand.model.config)  # a bounded-entry model: normalized q / k, logit scale = cap

    def route(model, make=None) -> None:
        """Kernel options of a swapped model through ``make`` (probe / low-rank heads), bounded if the model is."""
        if cap is not None:
            route_bounded_(model, cap, make)
        elif make is not None:
            install_attention_probe(model, make)

    if change and cap is not None:
        raise StageError(
            "verify_gradient",
            f"the model has bounded-entry attention (logit cap {cap:g}) and an attention kernel swap"
            f" ({change.get('kernel')}); the edgepipe kernels do not normalize q / k: drop the attention stage",
        )
    if change:
        _reapply_swap(cand.model, change)
    ref = _load64(art, ctx, reference=True)
    if not block_sparse:
        swap_attention_(ref.model, kernel="naive")  # dense softmax in float64 (block-sparse: already masked naive)
    route(ref.model)
    batches = encode(
        cand, calib[: cfg.samples], max_length=ctx.run.calibration.max_length, batch_size=ctx.run.calibration.batch_size
    )
    try:
        kernel_gradients = compare_layer_gradients(cand.model, ref.model, batches, seed=seed)
    except ValueError as exc:
        raise StageError("verify_gradient", str(exc)) from None
    for row in kernel_gradients["per_layer"]:
        if not row["rel_err"] <= cfg.max_rel_err:
            failures.append(
                {
                    "target": "pytorch",
                    "check": f"kernel_gradients layer {row['layer']}",
                    "value": f"{row['rel_err']:.3g}",
                    "limit": cfg.max_rel_err,
                }
            )
    del cand

    # (b) beta per head on calibration text (the reference model computes the same q, k)
    probes: list[BetaProbe] = []

    def make_probe(layer: int, inner: Any) -> BetaProbe:
        probes.append(BetaProbe(inner))
        return probes[-1]

    route(ref.model, make_probe)
    with torch.no_grad():
        for b in batches:
            ref.model(**b)
    conf = ref.model.config
    max_pos = _max_positions(conf)
    n_fast = min(cfg.seq_len, max_pos) if max_pos else cfg.seq_len
    heads: list[dict[str, Any]] = []
    degrees: list[list[int | None]] = []
    for layer, probe in enumerate(probes):
        d = probe.head_dim or 1
        limit = cfg.max_features if cfg.max_features is not None else max(1, n_fast // d)
        layer_degrees: list[int | None] = []
        for head, (beta, p99) in enumerate(probe.stats()):
            plan = head_applicability(beta, d, eps=cfg.kernel_eps, max_features=limit)
            heads.append(
                {
                    "layer": layer,
                    "head": head,
                    "beta": beta,
                    "beta_p99": p99,
                    "applicable": plan.applicable,
                    "degree": plan.degree,
                    "features": plan.features,
                }
            )
            layer_degrees.append(plan.degree if plan.applicable else None)
        # the layer's applicable heads run together at their largest degree (one call; more accurate, not less)
        top = max((g for g in layer_degrees if g is not None), default=None)
        degrees.append([None if g is None else top for g in layer_degrees])
    del ref
    n_app = sum(h["applicable"] for h in heads)
    ctx.log.info(
        "verify_gradient: %d of %d heads in the polynomial regime (kernel_eps %g)", n_app, len(heads), cfg.kernel_eps
    )

    # (c) the fast gradient at seq_len, where heads apply
    fast: dict[str, Any] | None = None
    notes: list[str] = []
    if n_app and not cfg.fast_gradient:
        notes.append("fast_gradient: off in the config")
    elif n_app and block_sparse:
        notes.append(
            "fast_gradient: skipped, the polynomial method has no block-sparse mask here (dense attention only)"
        )
    elif n_app:
        if n_fast < cfg.seq_len:
            notes.append(f"fast_gradient: seq_len {cfg.seq_len} capped to the model's {n_fast} positions")
        exact = _load64(art, ctx, reference=False)  # torch's own exact attention, float64 autograd
        fast_m = _load64(art, ctx, reference=False)
        swap_attention_(fast_m.model, kernel="naive")
        route(fast_m.model, lambda layer, inner: LowRankHeads(inner, degrees[layer]))
        long = _long_ids(exact, calib, n_fast, seed)
        t_exact, t_fast = [], []
        for _ in range(cfg.timing_repeats):  # interleaved, best of each: robust to a busy shared machine
            g_exact, t = _timed_grad(exact.model, long, seed)
            t_exact.append(t)
            try:
                g_fast, t = _timed_grad(fast_m.model, long, seed)
            except ValueError as exc:
                raise StageError("verify_gradient", f"fast gradient: {exc}") from None
            t_fast.append(t)
        del exact, fast_m
        rel = float((g_fast - g_exact).norm() / g_exact.norm())
        fast = {
            "seq_len": n_fast,
            "rel_err": rel,
            "seconds": round(min(t_fast), 4),
            "exact_seconds": round(min(t_exact), 4),
        }
        if not rel <= cfg.max_fast_rel_err:
            failures.append(
                {"target": "pytorch", "check": "fast_gradient", "value": f"{rel:.3g}", "limit": cfg.max_fast_rel_err}
            )

    ctx.metrics.update(
        {
            "kernel_gradients": kernel_gradients,
            "heads": heads,
            "fast_gradient": fast,
            "applicable_heads": n_app,
            "kernel": change["kernel"] if change else None,
            "bounded_beta": cap,
            "samples": len(calib[: cfg.samples]),
            "limits": {
                "max_rel_err": cfg.max_rel_err,
                "kernel_eps": cfg.kernel_eps,
                "max_fast_rel_err": cfg.max_fast_rel_err,
            },
            "failures": failures,
            **({"notes": notes} if notes else {}),
        }
    )
    return art
