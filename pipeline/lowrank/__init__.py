"""Low-rank (polynomial-feature) attention: almost-linear gradients where entries are bounded; tensor attention.

Sources: paper notes ../shared/papers/gradient-dp-mlp-diffusion.md §0 (toolkit), §1 (multi-layer gradients,
arXiv 2408.13233), §3 (tensor attention training, arXiv 2405.16411).
"""

from .attention import attention_beta, lowrank_attention, poly_attention_ref, softmax_attention_grads_ref, softmax_attention_ref
from .features import PolyFeatures, degree_for, degree_rule, feature_count, taylor_error_bound
from .ops import lowrank_matmul, lowrank_matmul_t, rowwise_kron

__all__ = [
    "PolyFeatures",
    "attention_beta",
    "degree_for",
    "degree_rule",
    "feature_count",
    "lowrank_attention",
    "lowrank_matmul",
    "lowrank_matmul_t",
    "poly_attention_ref",
    "rowwise_kron",
    "softmax_attention_grads_ref",
    "softmax_attention_ref",
    "taylor_error_bound",
]
