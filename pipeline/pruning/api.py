"""``prune_model``: the sequential layer-by-layer pruning driver.

For each block (see :mod:`pipeline.pruning.calibration` for the protocol): collect calibration statistics on
the block's current inputs, prune the block's target matrices with the configured method and pattern, then
produce the next block's inputs (pruned outputs when ``cfg.sequential``, dense outputs otherwise).
Magnitude pruning needs no calibration data and skips the capture.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.pruning.adapters import ROLES_BY_TARGET, BlockView, MatrixRef, blocks
from pipeline.pruning.calibration import (
    LayerStats,
    capture_first_block_inputs,
    collect_block_stats,
    collect_cross_stats,
    run_block,
)
from pipeline.pruning.config import PruneConfig, structured_units
from pipeline.pruning.metrics import attention_error, layer_output_error, sparsity_report
from pipeline.pruning.registry import MatrixInputs, PruneMethod, matrix_methods, prune_method
from pipeline.pruning.structured import (
    augmented_hessian,
    obs_select_and_compensate,
    remove_ffn_neurons_,
    remove_heads_,
    units_to_remove,
)

__all__ = ["PruneResult", "prune_model", "target_roles"]

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Progress = Callable[[str, int, int], None]


@dataclass
class PruneResult:
    """Outcome of :func:`prune_model`.

    Args:
        model: the pruned model (the input object, mutated in place).
        metrics: JSON-serializable report: ``sparsity`` (per matrix + ``overall``), ``parts`` (qk/vo/ffn),
            ``attention_error`` and ``layer_output_error`` (when ``eval_batches`` were given), ``seconds``,
            ``method``, ``pattern``, ``per_layer`` (what was done in each block).
    """

    model: nn.Module
    metrics: dict[str, Any]


def target_roles(block: BlockView, targets: str) -> list[str]:
    """Matrix roles of ``block`` selected by ``PruneConfig.targets``."""
    wanted = ROLES_BY_TARGET[targets]
    return [r for r in block.matrices() if r in wanted or r.split(".")[0] in wanted]


def _part(role: str) -> str:
    return {"q": "qk", "k": "qk", "v": "vo", "o": "vo"}.get(role, "ffn")


def _correct_toward_dense(ref: MatrixRef, stats: LayerStats | None, cross: torch.Tensor, ridge: float) -> None:
    """Replace ``ref``'s weight (and bias) by the dense-output reconstruction in place.

    ``H`` and ``C`` are the augmented (in+1) moments of the pruned-model inputs and of pruned x dense inputs
    (:func:`collect_cross_stats`); the new ``[W' b']`` minimises
    ``sum_t ||W' x_t + b' - (W xd_t + b)||^2 + lam ||W' - W||^2`` with ``lam = ridge * mean(diag H)``, i.e.
    ``[W b] (C + lam)^T (H + lam)^-1``: it maps what this matrix now sees to what the dense matrix produced,
    shrunk toward the dense weight (not toward 0) because a calibration set of a few thousand tokens
    over-fits a full least-squares re-solve (MiniLM 50 %: ridge 0.01 lost 0.12 held-out cosine, 1.0 gained).
    """
    assert stats is not None  # cross moments exist only where calibration statistics were collected
    W = ref.weight.double()
    n_in = W.shape[1]
    bias = ref.bias
    Wa = torch.cat(
        [W, (bias.double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64))[:, None]], 1
    )
    H = augmented_hessian(stats.hessians[ref.role], stats.sums[ref.role], stats.tokens[ref.role])
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    lam = ridge * float(torch.diag(H)[:n_in].mean())
    C = cross.double().clone()
    # ridge toward the dense weight, not toward 0: argmin ||W'X - W Xd||^2 + lam ||W' - W||^2
    H.diagonal()[:n_in].add_(lam)
    C.diagonal()[:n_in].add_(lam)
    if bias is None:  # no constant input: the map has no bias to move
        H, C, Wa = H[:n_in, :n_in], C[:n_in, :n_in], Wa[:, :n_in]
    new = torch.cholesky_solve(C @ Wa.t(), torch.linalg.cholesky(H)).t()  # (out, in[+1]) = Wa (C+lam)^T (H+lam)^-1
    ref.weight = new[:, :n_in]
    if bias is not None:
        ref.bias = new[:, n_in]


def _prune_matrix(ref: MatrixRef, method: PruneMethod, cfg: PruneConfig, stats: LayerStats | None) -> None:
    """Prune one (out, in) matrix in place with a method's per-matrix rule."""
    assert method.prune_matrix is not None
    W = ref.weight.detach().clone(memory_format=torch.contiguous_format)  # GPT-2 slices are strided views
    inputs = MatrixInputs(
        sq_norms=stats.sq_norms[ref.role] if "sq_norms" in method.needs and stats is not None else None,
        hessian=stats.hessians[ref.role] if "hessian" in method.needs and stats is not None else None,
    )
    ref.weight = method.prune_matrix(W, inputs, cfg)


def _matrix_method(cfg: PruneConfig) -> PruneMethod:
    """The method whose per-matrix rule prunes the matrices (and chooses the units) the configured method does
    not prune itself: the method, or a joint q/k method's companion (its options' ``companion``)."""
    spec = cfg.method_spec
    if spec.prune_matrix is not None:
        return spec
    opts = cfg.attention_options
    # the q/k method's own default (AttentionMethodConfig.companion) when no options are given
    comp = opts.get("companion", "sparsegpt") if isinstance(opts, dict) else getattr(opts, "companion", "sparsegpt")
    if comp not in matrix_methods():
        raise ValueError(f"companion of method {cfg.method!r} must be one of {matrix_methods()}, got {comp!r}")
    return prune_method(comp)


def _prune_block_unstructured(
    block: BlockView,
    cfg: PruneConfig,
    roles: list[str],
    stats: LayerStats | None,
    prune_qk: Any,
    cross: dict[str, torch.Tensor] | None = None,
    attn_target: torch.Tensor | None = None,
) -> dict[str, Any]:
    mats = block.matrices()
    info: dict[str, Any] = {}
    rest = roles
    if prune_qk is not None and {"q", "k"} <= set(roles):
        assert stats is not None  # a q/k rule needs calibration (PruneMethod.needs_calibration)
        q, k = block.q, block.k
        clone = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        dense_qk = (clone(q.weight), clone(q.bias), clone(k.weight), clone(k.bias))
        start = None
        if cross is not None and "q" in cross and "k" in cross:  # correct_qk: start from the dense-stream re-solve
            _correct_toward_dense(q, stats, cross["q"], cfg.correction_ridge)
            _correct_toward_dense(k, stats, cross["k"], cfg.correction_ridge)
            start = (clone(q.weight), clone(q.bias), clone(k.weight), clone(k.bias))
        with torch.enable_grad():  # prune_qk may optimise masks with autograd; the driver runs under no_grad
            res = prune_qk(
                *dense_qk,
                stats.attn_input,
                stats.attn_pad_mask,
                block.geometry,
                # one n:m convention everywhere: n weights kept in every group of m
                sparsity=cfg.effective_sparsity,
                pattern=cfg.pattern,
                n=cfg.n,
                m=cfg.m,
                cfg=cfg.attention_options,
                hessian_q=stats.hessians.get("q"),
                hessian_k=stats.hessians.get("k"),
                X_target=attn_target,
                start=start,
            )
        q.weight, k.weight = res.wq, res.wk
        if q.bias is not None:
            q.bias = res.bq
        if k.bias is not None:
            k.bias = res.bk
        info["qk_stats"] = _jsonable(getattr(res, "stats", {}))
        rest = [r for r in roles if r not in ("q", "k")]
    method = _matrix_method(cfg)
    for role in rest:
        if cross is not None and role in cross and method.reconstructs:
            _correct_toward_dense(mats[role], stats, cross[role], cfg.correction_ridge)
        _prune_matrix(mats[role], method, cfg, stats)
    info["pruned"] = [mats[r].qualname for r in roles]
    return info


def _reduce_qk_dims(
    model: nn.Module, block: BlockView, cfg: PruneConfig, stats: LayerStats | None, attn_target: torch.Tensor | None
) -> dict[str, Any]:
    """Narrow every head's q/k width of one block (unit ``qk_dims``); returns the layer's report entry."""
    from pipeline.pruning.qk_dims import qk_keep, reduce_qk, replace_qk_

    g = block.geometry
    keep = qk_keep(g.head_dim, cfg.sparsity if cfg.qk_sparsity is None else cfg.qk_sparsity)
    if keep == g.head_dim:
        return {}
    q, k = block.q, block.k
    X = None if stats is None else stats.attn_input
    pad = None if stats is None else stats.attn_pad_mask
    res = reduce_qk(
        q.weight,
        q.bias,
        k.weight,
        k.bias,
        X,
        pad,
        g,
        keep=keep,
        method=cfg.method,  # its registered qk_width_rule; PruneConfig refuses qk_dims for a method without one
        cfg=cfg.attention_options,
        X_target=attn_target,
    )
    replace_qk_(model, block.index, res.wq, res.bq, res.wk, res.bk)
    return {
        "qk_width": [g.head_dim, keep],
        "qk_stats": _jsonable({k_: v for k_, v in res.stats.items() if k_ != "qk_kept_dims"}),
    }


def _obs_units(
    mat: MatrixRef,
    role: str,
    group: int,
    k: int,
    stats: LayerStats | None,
    cross: dict[str, torch.Tensor] | None,
    cfg: PruneConfig,
) -> list[int] | None:
    """The ``k`` units of ``mat`` (groups of ``group`` input columns: a neuron, a head) OBS removes with the least
    output error, the kept columns compensated in place (``role``'s Hessian; corrected toward the dense model
    first when ``cross`` is given). None when there is nothing to remove (``k`` = 0)."""
    if k == 0:
        return None
    assert stats is not None  # OBS reads the Hessian (hess_roles)
    if cross is not None:
        _correct_toward_dense(mat, stats, cross[role], cfg.correction_ridge)
    return obs_select_and_compensate(
        mat, stats.hessians[role], stats.sums[role], stats.tokens[role], group, k, percdamp=cfg.percdamp
    )


def _prune_block_structured(
    model: nn.Module,
    block: BlockView,
    cfg: PruneConfig,
    stats: LayerStats | None,
    cross: dict[str, torch.Tensor] | None = None,
    units: tuple[str, ...] | None = None,
    attn_target: torch.Tensor | None = None,
) -> dict:
    """Remove q/k widths, heads and FFN neurons of one block (``units``: a subset of ``structured_units(cfg)``)."""
    method = _matrix_method(cfg)
    # units ranked by input norms when the method reads them, by weight norms otherwise
    sq = stats.sq_norms if (stats is not None and "sq_norms" in method.needs) else None
    obs = method.reconstructs  # OBS choice of the units + least-squares re-fit of the output matrix
    info: dict[str, Any] = {}
    units = structured_units(cfg) if units is None else units
    if "ffn" in units:
        # FFN first: q/k narrowing and head removal replace q/k/v/o modules but not the FFN ones, and vice versa
        k = units_to_remove(block.ffn_out.in_features, cfg.sparsity if cfg.ffn_sparsity is None else cfg.ffn_sparsity)
        chosen = _obs_units(block.ffn_out, "ffn_out", 1, k, stats, cross, cfg) if obs else None
        info["ffn_removed"] = remove_ffn_neurons_(model, block, k, sq, units=chosen)
    if "qk_dims" in units:
        info.update(_reduce_qk_dims(model, block, cfg, stats, attn_target))
        block = blocks(model)[block.index]  # fresh view: the self-attention module was replaced
    if "heads" in units:
        g = block.geometry
        k = units_to_remove(g.num_kv_heads, cfg.sparsity if cfg.head_sparsity is None else cfg.head_sparsity)
        # o_proj's input is the per-head attention output softmax(QK^T)V: its columns come in head groups
        chosen = _obs_units(block.o, "o", g.group_size * g.value_head_dim, k, stats, cross, cfg) if obs else None
        info["heads_removed"] = remove_heads_(model, block, k, sq, units=chosen)
    return info


def _correction_groups(cfg: PruneConfig, roles: list[str]) -> list[tuple[str, ...]]:
    """Matrices of a block in the order error correction prunes them, one group per distinct input.

    Each group is pruned before the next group's inputs are collected (true-sequential inside the block): a
    matrix corrected toward the dense outputs changes what the matrices after it see, and correcting them
    from stale inputs would correct the same error twice.
    """
    if cfg.pattern == "structured":  # q/k widths, heads (o's re-fit sees the narrowed attention), then the FFN
        return [(u,) for u in structured_units(cfg) if u != "layers"]  # blocks are dropped before this
    stage = lambda r: 0 if r in ("q", "k", "v") else 1 if r == "o" else 2 if r.startswith("ffn_in") else 3  # noqa: E731
    groups = [tuple(r for r in roles if stage(r) == i) for i in range(4)]
    return [g for g in groups if g]


def _prune_block_corrected(
    model: nn.Module,
    index: int,
    cfg: PruneConfig,
    roles: list[str],
    hess_roles: list[str],
    inputs: list[Any],
    dense_inputs: list[Any],
    prune_qk: Any,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Prune block ``index`` with every reconstruction aimed at the dense model's outputs.

    Returns:
        (per-layer info, the dense block outputs = the next block's dense inputs).
    """
    dense_layer = copy.deepcopy(blocks(model)[index].layer)  # the dense stream keeps running the dense block
    attention = cfg.method_spec.qk_rule is not None  # q and k pruned jointly on the attention objective
    info: dict[str, Any] = {"pruned": []}
    dense_next: list[torch.Tensor] | None = None
    for group in _correction_groups(cfg, roles):
        block = blocks(model)[index]  # fresh view: structured removal replaces modules
        if cfg.pattern == "structured":
            mats = {"heads": ["o"], "ffn": ["ffn_out"], "qk_dims": ["q", "k"]}[group[0]]
        else:
            mats = list(group)
        need_attn = (attention or cfg.pattern == "structured") and "q" in mats
        stats = collect_block_stats(
            block,
            inputs,
            mats,
            hessian_roles=[r for r in hess_roles if r in mats],
            keep_attn_input=need_attn,
            keep_outputs=False,
        )
        correct_qk = attention and bool(getattr(cfg.attention_options, "correct_qk", False))
        cross_roles = [r for r in mats if r in hess_roles and (correct_qk or not (attention and r in ("q", "k")))]
        cross, dense_out, attn_target = collect_cross_stats(
            block, inputs, dense_inputs, cross_roles, dense_layer=dense_layer, keep_attn_input=need_attn
        )
        dense_next = dense_out if dense_next is None else dense_next
        if cfg.pattern == "structured":
            info.update(_prune_block_structured(model, block, cfg, stats, cross, units=group, attn_target=attn_target))
        else:
            part = _prune_block_unstructured(block, cfg, mats, stats, prune_qk, cross, attn_target)
            info["pruned"] += part.pop("pruned")
            info.update(part)
    if not info["pruned"]:
        info.pop("pruned")
    assert dense_next is not None
    return info, dense_next


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)


def _all_block_matrices(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """qualname -> (role, (out, in) weight view) over all blocks."""
    out = {}
    for b in blocks(model):
        for role, ref in b.matrices().items():
            out[ref.qualname] = (role, ref.weight)
    return out


@torch.no_grad()
def prune_model(
    model: nn.Module,
    cfg: PruneConfig,
    calibration: Sequence[Batch],
    *,
    eval_batches: Sequence[Batch] | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune ``model`` in place with ``cfg``.

    Args:
        model: a supported HF model (BERT/RoBERTa/DistilBERT, GPT-2, Llama family).
        cfg: what to prune and how.
        calibration: tokenized batches ``{"input_ids": (B, n), "attention_mask": (B, n), ...}``; may be empty
            for magnitude pruning.
        eval_batches: if given, attention and layer-output errors against a dense copy are reported.
        progress: ``progress(stage, done, total)`` called after each block.

    Returns:
        :class:`PruneResult` with the (mutated) model and a JSON-serializable metrics dict.

    Raises:
        ValueError: calibration missing for a data-driven method, or ``sparsity > 0`` pruned nothing.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    spec = cfg.method_spec
    prune_qk = spec.qk_rule
    needs_calib = spec.needs_calibration
    if needs_calib and not calibration:
        raise ValueError(f"method {cfg.method!r} needs calibration batches, got {len(calibration)}")
    dense = copy.deepcopy(model) if eval_batches else None
    before = {k: v[1].numel() for k, v in _all_block_matrices(model).items()}

    views = blocks(model)
    structured = cfg.pattern == "structured"
    su = structured_units(cfg) if structured else ()
    depth: dict[str, Any] | None = None
    gone: list[tuple[str, int]] = []  # (part, elements) of the matrices in dropped blocks
    if "layers" in su:  # whole blocks first; the width units below then prune only the kept blocks
        from pipeline.pruning.depth import drop_layers_, layer_map

        frac = cfg.sparsity if cfg.layer_sparsity is None else cfg.layer_sparsity
        sizes = {
            o: [(_part(r), ref.weight.numel()) for r, ref in b.matrices().items()]
            for o, b in zip(layer_map(model), views)
        }
        depth = drop_layers_(model, calibration, units_to_remove(len(views), frac), cfg.layer_criterion, progress)
        gone = [x for o in depth["dropped"] for x in sizes[o]]
        views = blocks(model)
        before = {k: v[1].numel() for k, v in _all_block_matrices(model).items()}
        su = tuple(u for u in su if u != "layers")
    n_layers = len(views)
    roles = target_roles(views[0], cfg.targets)
    if structured:
        roles = [
            r
            for r in views[0].matrices()
            if (("heads" in su or "qk_dims" in su) and _part(r) == "qk")
            or ("heads" in su and _part(r) == "vo")
            or ("ffn" in su and _part(r) == "ffn")
        ]
    hess_roles: list[str] = []
    if "hessian" in _matrix_method(cfg).needs:
        hess_roles = [r for r in roles if not (prune_qk is not None and r in ("q", "k"))]
    if prune_qk is not None and {"q", "k"} <= set(roles):
        hess_roles += ["q", "k"]
    if structured:  # OBS needs the inputs of the output matrices only (head outputs, FFN activations)
        hess_roles = [r for r in ("o", "ffn_out") if r in roles] if _matrix_method(cfg).reconstructs else []

    do_prune = cfg.removes_anything and (not structured or bool(su))  # width units left after a depth cut
    inputs = capture_first_block_inputs(model, views[0], calibration) if (needs_calib and do_prune) else None
    # error correction: a second stream of dense hidden states; reconstructed matrices aim at the dense outputs
    correct = cfg.corrects_errors and inputs is not None
    dense_inputs = list(inputs) if correct and inputs is not None else None
    per_layer: list[dict[str, Any]] = []
    for i in range(n_layers):
        block = blocks(model)[i]  # fresh view: structured pruning replaces modules
        stats = None
        if correct:
            assert inputs is not None and dense_inputs is not None
            info, dense_next = _prune_block_corrected(model, i, cfg, roles, hess_roles, inputs, dense_inputs, prune_qk)
            dense_inputs = [dataclasses.replace(inp, hidden=h) for inp, h in zip(dense_inputs, dense_next)]
        else:
            if inputs is not None:
                qk_dims = structured and "qk_dims" in structured_units(cfg)
                stats = collect_block_stats(
                    block,
                    inputs,
                    roles,
                    hessian_roles=hess_roles,
                    keep_attn_input=prune_qk is not None or qk_dims,
                    keep_outputs=not cfg.sequential,
                )
            if not do_prune:
                info = {}
            elif structured:
                info = _prune_block_structured(model, block, cfg, stats)
            else:
                info = _prune_block_unstructured(block, cfg, roles, stats, prune_qk)
        per_layer.append(info)
        logger.debug("layer %d/%d pruned: %s", i + 1, n_layers, {k: v for k, v in info.items() if k != "pruned"})
        if inputs is not None and i + 1 < n_layers:
            if cfg.sequential:
                block = blocks(model)[i]
                hidden = [run_block(block, inp) for inp in inputs]  # pruned outputs feed the next block
            else:
                assert stats is not None  # collected whenever inputs are
                hidden = stats.outputs  # dense outputs (one-shot protocol)
            inputs = [dataclasses.replace(inp, hidden=h) for inp, h in zip(inputs, hidden)]
        if progress is not None:
            progress("prune", i + 1, n_layers)

    # ---- report -------------------------------------------------------------------------------------------
    after = _all_block_matrices(model)
    metrics: dict[str, Any] = {"method": cfg.method, "pattern": cfg.pattern, "config": cfg.model_dump(mode="json")}
    if structured:
        # removed fraction of the elements of each (original) matrix; parts aggregate by qk / vo / ffn
        # (kept blocks after a depth cut: their new names; the dropped blocks count in overall and parts)
        rem = {k: 1.0 - after[k][1].numel() / before[k] for k in before}
        metrics["sparsity"] = dict(rem)
        tot_b = sum(before.values()) + sum(n for _, n in gone)
        tot_a = sum(after[k][1].numel() for k in before)
        metrics["sparsity"]["overall"] = 1.0 - tot_a / tot_b
        parts: dict[str, list[int]] = {}
        for k, (role, w) in after.items():
            p = parts.setdefault(_part(role), [0, 0])
            p[0] += before[k] - w.numel()
            p[1] += before[k]
        for part, n in gone:
            p = parts.setdefault(part, [0, 0])
            p[0] += n
            p[1] += n
        if depth is not None:
            metrics["layers"] = _jsonable(depth)
        metrics["removed_units"] = [
            {
                "heads": info.get("heads_removed", []),
                "ffn": len(info.get("ffn_removed", [])),
                **({"qk_width": info["qk_width"]} if "qk_width" in info else {}),
            }
            for info in per_layer
        ]
        pruned_any = tot_a < tot_b
    else:
        chosen = {k: w for k, (role, w) in after.items() if role in roles}
        metrics["sparsity"] = sparsity_report(model, chosen)
        parts = {}
        for role, w in after.values():
            if role in roles:
                p = parts.setdefault(_part(role), [0, 0])
                p[0] += int((w == 0).sum())
                p[1] += w.numel()
        pruned_any = any(p[0] for p in parts.values())
    metrics["parts"] = {name: z / t for name, (z, t) in parts.items() if t}
    metrics["per_layer"] = _jsonable(per_layer)
    if do_prune and not pruned_any:
        raise ValueError(
            f"sparsity={cfg.effective_sparsity!r} with method={cfg.method!r}, pattern={cfg.pattern!r} pruned nothing"
            " (too few weights per row/unit for this sparsity?)"
        )
    if eval_batches and depth is not None:  # blocks no longer pair up one to one: the final output's error only
        from pipeline.pruning.depth import output_error

        assert dense is not None  # copied above when eval_batches were given
        metrics["output_error"] = output_error(dense, model, eval_batches)
    elif eval_batches:
        assert dense is not None  # copied above when eval_batches were given
        metrics["attention_error"] = attention_error(dense, model, eval_batches)
        metrics["layer_output_error"] = layer_output_error(dense, model, eval_batches)
    metrics["seconds"] = time.perf_counter() - t0
    if was_training:
        model.train()
    logger.info(
        "pruned %d blocks with %s/%s: overall sparsity %.4f in %.2fs",
        n_layers,
        cfg.method,
        cfg.pattern,
        metrics["sparsity"]["overall"],
        metrics["seconds"],
    )
    return PruneResult(model=model, metrics=metrics)
