"""Task fidelity of a compressed model vs the dense one (pure numpy, used by validate and the benchmarks).

Encoders: cosine of mean-pooled, L2-normalised embeddings and neighbour recall@k (do the k nearest
neighbours of each passage stay the same?). Causal LMs: next-token top-1 agreement and perplexity.
"""

from __future__ import annotations

import numpy as np

__all__ = ["embedding_fidelity", "lm_fidelity", "mean_pool", "perplexity", "recall_at_k"]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B, S, H) hidden states, (B, S) mask -> (B, H) L2-normalised mean over real tokens."""
    m = mask.astype(np.float64)[..., None]  # (B, S, 1)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def recall_at_k(ref: np.ndarray, got: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's k nearest neighbours (cosine, self excluded) under ``ref`` vs ``got``."""
    n = ref.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise ValueError(f"recall@k needs at least 2 passages, got {n}")

    def knn(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    a, b = knn(ref), knn(got)
    return float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))


def embedding_fidelity(ref: np.ndarray, got: np.ndarray, k: int = 10) -> dict[str, float]:
    """ref/got: (N, H) normalised embeddings of the same passages."""
    cos = np.sum(ref * got, axis=1)
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        f"recall_at_{k}": recall_at_k(ref, got, k),
        "n": int(ref.shape[0]),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """Next-token perplexity: logits (B, S, V) predict ids[:, 1:] where both positions are real tokens."""
    lp = _log_softmax(logits[:, :-1])  # (B, S-1, V)
    tgt = ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    nll = -np.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
    return float(np.exp(nll[valid].mean()))


def lm_fidelity(ref_logits: np.ndarray, got_logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    valid = mask.astype(bool)
    agree = (ref_logits.argmax(-1) == got_logits.argmax(-1))[valid]
    p_ref, p_got = perplexity(ref_logits, ids, mask), perplexity(got_logits, ids, mask)
    return {
        "top1_agreement": float(agree.mean()),
        "ppl_dense": p_ref,
        "ppl": p_got,
        "ppl_delta": p_got - p_ref,
        "ppl_ratio": p_got / p_ref,
    }
