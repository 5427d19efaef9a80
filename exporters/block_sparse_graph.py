"""Block-sparse attention as a standard-ONNX subgraph that computes only the kept blocks.

Design follows the measurements in ``shared/design/sparse-attention-ort.md`` (approach A',
"superblock gather" with the opset-23 ``Attention`` op as the core), which was the fastest
form on ORT 1.32 CPU:

* Q/K/V are zero-padded along the sequence to a multiple of the query superblock
  ``bq = query_group * block`` (padding amount computed in-graph, so ``n`` is dynamic).
* For each query superblock ``r`` an int64 row ``idx[r]`` lists the key blocks it needs
  (global blocks first, then the window); K and V are gathered with ``Gather(axis=2)``.
* The opset-23 ``Attention`` op runs on 4-D tensors whose *head* axis carries the query
  superblock axis, so the per-superblock boolean mask ``(1, nr, bq, L)`` broadcasts over
  the real batch*heads axis.  The mask is exact at ``block`` granularity (it masks the
  extra entries a superblock computes, clamped duplicate blocks, padded keys and, for
  causal patterns, future tokens).
* Global query rows (``global_window``) are computed densely and concatenated in front.

Shape legend: B batch, H query heads, Hkv key/value heads (GQA: H = Hkv * rep), N tokens,
D head dim, b block, bq = query_group * b, nr = ceil(N / bq) query superblocks,
nbk = nr * bq / b key blocks, KB key blocks per superblock, L = KB * b gathered keys.

Where the block index and mask come from:

* ``window``, ``causal_window``, ``global_window``: computed **in-graph** from the
  sequence length (Shape/Range/arithmetic), so one model serves every ``n``.
* ``explicit``: fed as **graph inputs** ``block_index`` (nr, KB) int64 and ``block_mask``
  (nr, bq, L) bool, built on the host per ``n`` with :func:`explicit_block_inputs`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.graph import NodeBuilder
from pipeline.kernels.patterns import BlockSparsePattern, pattern_layout, pattern_token_mask

logger = logging.getLogger(__name__)

__all__ = [
    "BLOCK_SPARSE_NODE_PREFIX",
    "BlockSparsePattern",
    "add_block_sparse_attention",
    "block_sparse_attention_model",
    "explicit_block_inputs",
    "pattern_layout",
    "pattern_token_mask",
    "reference_block_sparse",
]

#: Every node of a block-sparse subgraph is named ``f"{BLOCK_SPARSE_NODE_PREFIX}{k}/..."``;
#: the core Attention node of subgraph ``k`` is ``f"{BLOCK_SPARSE_NODE_PREFIX}{k}/core"``.
BLOCK_SPARSE_NODE_PREFIX = "block_sparse_attention/"

# ----------------------------------------------------------------------------------------
# Host-side helpers: layouts, explicit inputs, float64 oracle
# ----------------------------------------------------------------------------------------


def reference_block_sparse(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    layout: np.ndarray,
    *,
    block: int,
    causal: bool,
    key_padding: np.ndarray | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """Float64 oracle: softmax attention restricted to a block layout.

    Args:
        q: (B, H, N, D) queries.
        k: (B, Hkv, N, D) keys, H % Hkv == 0 (GQA: query head h uses kv head h // rep).
        v: (B, Hkv, N, D) values.
        layout: (nb, nb) bool, nb = ceil(N / block); True = block kept.
        block: block size in tokens.
        causal: also keep only keys j <= i at token level.
        key_padding: optional (B, N) bool, True = real key token.
        scale: score scale, default 1 / sqrt(D).

    Returns:
        (B, H, N, D) float64; query rows with no allowed key are 0 (as ORT's Attention).
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"query heads {H} not a multiple of kv heads {Hkv}")
    k = np.repeat(k, H // Hkv, axis=1)  # (B, H, N, D): kv head h // rep serves query head h
    v = np.repeat(v, H // Hkv, axis=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    blk = np.arange(N) // block
    allowed = np.asarray(layout, dtype=bool)[blk[:, None], blk[None, :]]  # (N, N) token mask
    if causal:
        allowed = allowed & (np.arange(N)[None, :] <= np.arange(N)[:, None])
    allowed = np.broadcast_to(allowed, (B, 1, N, N))
    if key_padding is not None:
        allowed = allowed & np.asarray(key_padding, dtype=bool)[:, None, None, :]
    s = np.einsum("bhnd,bhmd->bhnm", q, k) * scale  # (B, H, N, N)
    s = np.where(allowed, s, -np.inf)
    row_max = s.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.exp(s - row_max)  # exp(-inf) = 0 for masked entries
    denom = p.sum(axis=-1, keepdims=True)
    p = np.divide(p, denom, out=np.zeros_like(p), where=denom > 0)
    return np.einsum("bhnm,bhmd->bhnd", p, v)


def explicit_block_inputs(pattern: BlockSparsePattern, n: int) -> dict[str, np.ndarray]:
    """Host-side ``block_index`` / ``block_mask`` feeds for an ``explicit`` pattern.

    Args:
        pattern: an ``explicit`` pattern (its ``layout`` covers at least ceil(n / block)).
        n: the sequence length of this run.

    Returns:
        ``{"block_index": (nr, KB) int64, "block_mask": (nr, bq, KB * block) bool}``.
    """
    if pattern.kind != "explicit":
        raise ValueError(f"explicit_block_inputs needs kind 'explicit', got {pattern.kind!r}")
    b, G, bq = pattern.block, pattern.query_group, pattern.superblock
    nr = math.ceil(n / bq)
    nbk = nr * G
    lay = np.zeros((nbk, nbk), dtype=bool)
    real = pattern_layout(pattern, n)
    lay[: real.shape[0], : real.shape[1]] = real
    rows = [np.flatnonzero(lay[r * G : (r + 1) * G].any(axis=0)) for r in range(nr)]
    KB = max(1, max(len(r) for r in rows))
    idx = np.zeros((nr, KB), dtype=np.int64)
    mask = np.zeros((nr, bq, KB * b), dtype=bool)
    for r, cols in enumerate(rows):
        idx[r, : len(cols)] = cols  # tail stays 0 and masked: a harmless duplicate
        qtok = r * bq + np.arange(bq)  # (bq,)
        for t, c in enumerate(cols):
            ktok = c * b + np.arange(b)  # (b,)
            keep = lay[qtok // b, c][:, None] & (ktok < n)[None, :]
            if pattern.causal:
                keep = keep & (ktok[None, :] <= qtok[:, None])
            mask[r, :, t * b : (t + 1) * b] = keep
    return {"block_index": idx, "block_mask": mask}


# ----------------------------------------------------------------------------------------
# Graph construction
# ----------------------------------------------------------------------------------------


def _in_graph_index_and_mask(
    bld: NodeBuilder, pattern: BlockSparsePattern, n: str, nr: str, nbk: str
) -> tuple[str, str]:
    """Build idx (nr, KB) int64 and the pattern mask (nr, bq, L) bool from scalar ``n``.

    Args:
        bld: builder.
        pattern: a built-in pattern.
        n, nr, nbk: names of int64 scalars (tokens, query superblocks, key blocks).
    """
    b, G, bq = pattern.block, pattern.query_group, pattern.superblock
    w, g = pattern.window_blocks, pattern.global_blocks
    causal = pattern.is_causal
    W = G + w if causal else G + 2 * w  # window key blocks per superblock
    KB = g + W
    L = KB * b
    zero, one = bld.scalar(0), bld.scalar(1)
    r = bld.op("Range", zero, nr, one)  # (nr,)
    r_col = bld.op("Unsqueeze", r, bld.i64(1))  # (nr, 1)
    start = bld.op("Sub", bld.op("Mul", r_col, bld.scalar(G)), bld.scalar(w))  # (nr, 1) first window block
    raw_w = bld.op("Add", start, bld.const(np.arange(W)[None, :]))  # (nr, W) unclamped window blocks
    if g:
        raw_g = bld.op(
            "Expand", bld.const(np.arange(g)[None, :]), bld.shape_cat(bld.op("Unsqueeze", nr, bld.i64(0)), g)
        )
        raw = bld.op("Concat", raw_g, raw_w, axis=1)  # (nr, KB): global blocks first
    else:
        raw = raw_w
    is_glob = bld.const(np.arange(KB) < g, dtype=bool)  # (KB,)
    last = bld.op("Sub", nbk, one)
    idx = bld.op("Min", bld.op("Max", raw, zero), last)  # (nr, KB) clamped, safe for Gather
    in_range = bld.op("And", bld.op("GreaterOrEqual", raw, zero), bld.op("Less", raw, nbk))
    # window blocks below g duplicate a global block: drop them so no key counts twice
    not_dup = bld.op("Or", is_glob, bld.op("GreaterOrEqual", raw, bld.scalar(g)))
    blk_ok = bld.op("And", in_range, not_dup)  # (nr, KB)

    # token coordinates
    s = bld.const(np.arange(b)[None, None, :])  # (1, 1, b)
    ktok = bld.op("Add", bld.op("Mul", bld.op("Unsqueeze", idx, bld.i64(2)), bld.scalar(b)), s)  # (nr, KB, b)
    ktok = bld.op("Reshape", ktok, bld.i64(0, 1, L))  # (nr, 1, L)
    kblk = bld.op("Div", ktok, bld.scalar(b))  # (nr, 1, L)
    qtok = bld.op(
        "Add",
        bld.op("Mul", bld.op("Unsqueeze", r_col, bld.i64(2)), bld.scalar(bq)),
        bld.const(np.arange(bq)[None, :, None]),
    )  # (nr, bq, 1)
    qblk = bld.op("Div", qtok, bld.scalar(b))  # (nr, bq, 1)
    blk_ok_t = bld.op(
        "Reshape", bld.op("Expand", bld.op("Unsqueeze", blk_ok, bld.i64(2)), bld.i64(1, 1, b)), bld.i64(0, 1, L)
    )  # (nr, 1, L)
    glob_t = bld.const(np.repeat(np.arange(KB) < g, b)[None, None, :], dtype=bool)  # (1, 1, L)

    diff = bld.op("Sub", qblk, kblk)  # (nr, bq, L) query block - key block
    if causal:
        in_win = bld.op("And", bld.op("GreaterOrEqual", diff, zero), bld.op("LessOrEqual", diff, bld.scalar(w)))
    else:
        in_win = bld.op("LessOrEqual", bld.op("Abs", diff), bld.scalar(w))
    keep = bld.op("Or", in_win, glob_t)
    keep = bld.op("And", keep, blk_ok_t)
    keep = bld.op("And", keep, bld.op("Less", ktok, n))  # padded keys
    if causal:
        keep = bld.op("And", keep, bld.op("LessOrEqual", ktok, qtok))
    return idx, keep  # keep: (nr, bq, L) bool


def add_block_sparse_attention(
    nodes: list[onnx.NodeProto],
    q: str,
    k: str,
    v: str,
    pattern: BlockSparsePattern,
    *,
    output: str,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int | None = None,
    key_padding_mask: str | None = None,
    scale: float | None = None,
    block_index: str | None = None,
    block_mask: str | None = None,
    index: int = 0,
) -> int:
    """Append the block-sparse attention subgraph to ``nodes`` (e.g. ``graph.node``).

    Only standard ONNX ops (opset >= 23: Attention) are used; the caller's model must
    import opset 23 or later. All node names start with ``f"{BLOCK_SPARSE_NODE_PREFIX}{index}/"``.

    Args:
        nodes: node list to extend (a ``GraphProto.node`` container or a python list).
        q: name of (B, H, N, D) float queries.
        k: name of (B, Hkv, N, D) keys.
        v: name of (B, Hkv, N, D) values.
        pattern: the block pattern.
        output: name for the (B, H, N, D) result.
        num_heads: H.
        head_dim: D.
        num_kv_heads: Hkv (GQA when < H); defaults to H.
        key_padding_mask: optional name of a (B, N) bool tensor, True = real key.
        scale: score scale, default 1 / sqrt(D).
        block_index, block_mask: ``explicit`` pattern only: names of the (nr, KB) int64 and
            (nr, bq, L) bool inputs (see :func:`explicit_block_inputs`).
        index: subgraph number used in node names (unique within the graph).

    Returns:
        The number of nodes appended.
    """
    H, D = num_heads, head_dim
    Hkv = num_kv_heads or H
    if H % Hkv:
        raise ValueError(f"num_heads {H} must be a multiple of num_kv_heads {Hkv}")
    rep = H // Hkv
    b, bq, g = pattern.block, pattern.superblock, pattern.global_blocks
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bld = NodeBuilder(f"{BLOCK_SPARSE_NODE_PREFIX}{index}/")

    # ---- sizes from the runtime sequence length
    n_1d = bld.op("Slice", bld.op("Shape", q), bld.i64(2), bld.i64(3))  # (1,) N
    n = bld.op("Squeeze", n_1d, bld.i64(0))  # scalar N
    bq_c = bld.scalar(bq)
    pad = bld.op("Mod", bld.op("Sub", bq_c, bld.op("Mod", n, bq_c)), bq_c)  # scalar (bq - N % bq) % bq
    np_tok = bld.op("Add", n, pad)  # scalar Np
    nr = bld.op("Div", np_tok, bq_c)  # scalar nr
    nbk = bld.op("Div", np_tok, bld.scalar(b))  # scalar nbk
    nr_1d = bld.op("Unsqueeze", nr, bld.i64(0))  # (1,)
    pad_1d = bld.op("Unsqueeze", pad, bld.i64(0))  # (1,)
    # Pad pads = [begins of 4 axes, ends of 4 axes]: only the end of the sequence axis
    pads4 = bld.shape_cat(0, 0, 0, 0, 0, 0, pad_1d, 0)
    qp = bld.op("Pad", q, pads4)  # (B, H, Np, D)
    kp = bld.op("Pad", k, pads4)  # (B, Hkv, Np, D)
    vp = bld.op("Pad", v, pads4)

    # ---- block index (nr, KB) and pattern mask (nr, bq, L)
    if pattern.kind == "explicit":
        if block_index is None or block_mask is None:
            raise ValueError("kind 'explicit' needs block_index and block_mask input names")
        idx, pmask = block_index, block_mask
    else:
        idx, pmask = _in_graph_index_and_mask(bld, pattern, n, nr, nbk)
    kb_1d = bld.op("Slice", bld.op("Shape", idx), bld.i64(1), bld.i64(2))  # (1,) KB
    L_1d = bld.op("Mul", kb_1d, bld.i64(b))  # (1,) L

    if key_padding_mask is None:
        # Layout A: Attention batch = B*Hkv, heads = nr (pure reshapes, mask broadcasts on batch)
        q6 = bld.op("Reshape", qp, bld.i64(0, Hkv, rep, -1, bq, D))  # (B, Hkv, rep, nr, bq, D)
        if rep > 1:
            q6 = bld.op("Transpose", q6, perm=[0, 1, 3, 2, 4, 5])  # (B, Hkv, nr, rep, bq, D)
        q4 = bld.op("Reshape", q6, bld.shape_cat(-1, nr_1d, rep * bq, D))  # (B*Hkv, nr, rep*bq, D)

        def kv4(t: str) -> str:
            t5 = bld.op("Reshape", t, bld.i64(0, Hkv, -1, b, D))  # (B, Hkv, nbk, b, D)
            tg = bld.op("Gather", t5, idx, axis=2)  # (B, Hkv, nr, KB, b, D)
            return bld.op("Reshape", tg, bld.shape_cat(-1, nr_1d, L_1d, D))  # (B*Hkv, nr, L, D)

        k4, v4 = kv4(kp), kv4(vp)
        if rep > 1:
            m = bld.op("Expand", bld.op("Unsqueeze", pmask, bld.i64(1)), bld.i64(1, rep, 1, 1))  # (nr, rep, bq, L)
        else:
            m = pmask
        mask4 = bld.op("Reshape", m, bld.shape_cat(1, -1, rep * bq, L_1d))  # (1, nr, rep*bq, L)
    else:
        # Layout B: Attention batch = Hkv, heads = B*nr, so the per-batch key mask can ride
        # on the head axis next to the per-superblock pattern mask.
        q6 = bld.op("Reshape", qp, bld.i64(0, Hkv, rep, -1, bq, D))  # (B, Hkv, rep, nr, bq, D)
        q6 = bld.op("Transpose", q6, perm=[1, 0, 3, 2, 4, 5])  # (Hkv, B, nr, rep, bq, D)
        q4 = bld.op("Reshape", q6, bld.i64(Hkv, -1, rep * bq, D))  # (Hkv, B*nr, rep*bq, D)

        def kv4(t: str) -> str:
            tt = bld.op("Transpose", t, perm=[1, 0, 2, 3])  # (Hkv, B, Np, D)
            t5 = bld.op("Reshape", tt, bld.i64(0, 0, -1, b, D))  # (Hkv, B, nbk, b, D)
            tg = bld.op("Gather", t5, idx, axis=2)  # (Hkv, B, nr, KB, b, D)
            return bld.op("Reshape", tg, bld.shape_cat(Hkv, -1, L_1d, D))  # (Hkv, B*nr, L, D)

        k4, v4 = kv4(kp), kv4(vp)
        kpm = bld.op("Cast", key_padding_mask, to=TensorProto.BOOL)  # (B, N)
        kpm = bld.op("Pad", kpm, bld.shape_cat(0, 0, 0, pad_1d), bld.const(False, dtype=bool))  # (B, Np)
        kpm = bld.op("Reshape", kpm, bld.i64(0, -1, b))  # (B, nbk, b)
        kpm = bld.op("Gather", kpm, idx, axis=1)  # (B, nr, KB, b)
        kpm = bld.op("Reshape", kpm, bld.shape_cat(0, -1, 1, 1, L_1d))  # (B, nr, 1, 1, L)
        pm5 = bld.op("Unsqueeze", pmask, bld.i64(0, 2))  # (1, nr, 1, bq, L)
        m = bld.op("And", kpm, pm5)  # (B, nr, 1, bq, L)
        if rep > 1:
            m = bld.op("Expand", m, bld.i64(1, 1, rep, 1, 1))  # (B, nr, rep, bq, L)
        mask4 = bld.op("Reshape", m, bld.shape_cat(1, -1, rep * bq, L_1d))  # (1, B*nr, rep*bq, L)

    core = bld.op("Attention", q4, k4, v4, mask4, name=f"{bld.prefix}core", scale=scale)

    # ---- back to (B, H, N, D)
    if key_padding_mask is None:
        o6 = bld.op("Reshape", core, bld.shape_cat(-1, Hkv, nr_1d, rep, bq, D))  # (B, Hkv, nr, rep, bq, D)
        if rep > 1:
            o6 = bld.op("Transpose", o6, perm=[0, 1, 3, 2, 4, 5])  # (B, Hkv, rep, nr, bq, D)
    else:
        o6 = bld.op("Reshape", core, bld.shape_cat(Hkv, -1, nr_1d, rep, bq, D))  # (Hkv, B, nr, rep, bq, D)
        o6 = bld.op("Transpose", o6, perm=[1, 0, 3, 2, 4, 5])  # (B, Hkv, rep, nr, bq, D)
    o4 = bld.op("Reshape", o6, bld.i64(0, H, -1, D))  # (B, H, Np, D)

    if pattern.kind == "global_window":
        # Global query rows attend to every key: dense Attention on the first g*b rows.
        gb = g * b
        qg = bld.op("Slice", q, bld.i64(0), bld.i64(gb), bld.i64(2))  # (B, H, min(gb, N), D)
        if rep > 1:
            # (B, Hkv, N, D) -> (B, H, N, D): kv head h // rep serves query head h
            def rep_kv(t: str) -> str:
                t5 = bld.op("Unsqueeze", t, bld.i64(2))  # (B, Hkv, 1, N, D)
                t5 = bld.op("Expand", t5, bld.i64(1, 1, rep, 1, 1))  # (B, Hkv, rep, N, D)
                return bld.op("Reshape", t5, bld.i64(0, H, -1, D))

            kg, vg = rep_kv(k), rep_kv(v)
        else:
            kg, vg = k, v
        if key_padding_mask is None:
            og = bld.op("Attention", qg, kg, vg, scale=scale)
        else:
            sg_1d = bld.op("Slice", bld.op("Shape", qg), bld.i64(2), bld.i64(3))  # (1,) rows
            mk = bld.op("Unsqueeze", bld.op("Cast", key_padding_mask, to=TensorProto.BOOL), bld.i64(1, 2))  # (B,1,1,N)
            # ORT's CPU Attention rejects a mask broadcast along q: expand to (B, 1, rows, N)
            b_1d = bld.op("Slice", bld.op("Shape", q), bld.i64(0), bld.i64(1))
            mk = bld.op("Expand", mk, bld.shape_cat(b_1d, 1, sg_1d, n_1d))
            og = bld.op("Attention", qg, kg, vg, mk, scale=scale)
        rest = bld.op("Slice", o4, bld.i64(gb), n_1d, bld.i64(2))  # (B, H, N - gb, D) sparse rows
        bld.op("Concat", og, rest, axis=2, out=output)
    else:
        bld.op("Slice", o4, bld.i64(0), n_1d, bld.i64(2), out=output)  # (B, H, N, D)

    nodes.extend(bld.nodes)
    logger.debug("block-sparse subgraph %d (%s): %d nodes", index, pattern.kind, len(bld.nodes))
    return len(bld.nodes)


def block_sparse_attention_model(
    pattern: BlockSparsePattern,
    *,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int | None = None,
    key_padding: bool = False,
    scale: float | None = None,
    opset: int = 23,
) -> onnx.ModelProto:
    """Standalone model: inputs ``q`` (B, H, N, D), ``k``/``v`` (B, Hkv, N, D) float32
    [+ ``key_padding_mask`` (B, N) bool] [+ ``block_index``/``block_mask`` for ``explicit``];
    output ``out`` (B, H, N, D). B and N are dynamic.

    Args:
        pattern: the block pattern.
        num_heads: H.
        head_dim: D.
        num_kv_heads: Hkv (GQA when < H).
        key_padding: add the ``key_padding_mask`` input (True = real key).
        scale: score scale, default 1 / sqrt(D).
        opset: default-domain opset, >= 23 (Attention).
    """
    if opset < 23:
        raise ValueError(f"the Attention op needs opset >= 23, got {opset}")
    Hkv = num_kv_heads or num_heads
    fl = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("q", fl, ["batch", num_heads, "seq", head_dim]),
        helper.make_tensor_value_info("k", fl, ["batch", Hkv, "seq", head_dim]),
        helper.make_tensor_value_info("v", fl, ["batch", Hkv, "seq", head_dim]),
    ]
    kpm = None
    if key_padding:
        inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, ["batch", "seq"]))
        kpm = "key_padding_mask"
    bi = bm = None
    if pattern.kind == "explicit":
        inputs.append(helper.make_tensor_value_info("block_index", TensorProto.INT64, ["n_superblocks", "kb"]))
        inputs.append(
            helper.make_tensor_value_info(
                "block_mask", TensorProto.BOOL, ["n_superblocks", pattern.superblock, "kb_tokens"]
            )
        )
        bi, bm = "block_index", "block_mask"
    nodes: list[onnx.NodeProto] = []
    add_block_sparse_attention(
        nodes,
        "q",
        "k",
        "v",
        pattern,
        output="out",
        num_heads=num_heads,
        head_dim=head_dim,
        num_kv_heads=Hkv,
        key_padding_mask=kpm,
        scale=scale,
        block_index=bi,
        block_mask=bm,
    )
    out = helper.make_tensor_value_info("out", fl, ["batch", num_heads, "seq", head_dim])
    graph = helper.make_graph(nodes, "block_sparse_attention", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgepipe")
    model.ir_version = min(model.ir_version, 10)  # ORT 1.32 reads IR <= 11; keep a conservative version
    return model
