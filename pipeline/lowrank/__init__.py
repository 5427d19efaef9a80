"""Low-rank (polynomial-feature) attention: almost-linear gradients where entries are bounded; tensor attention.

Sources: the polynomial method of Alman & Song 2023 (arXiv 2302.13214), "Multi-Layer Transformers Gradient Can be
Approximated in Almost Linear Time" (arXiv 2408.13233), "Tensor Attention Training" (arXiv 2405.16411).
"""

from .attention import (
    lowrank_attention,
    lowrank_attention_backward,
    lowrank_attention_forward,
    poly_attention_ref,
    softmax_attention_grads_ref,
    softmax_attention_ref,
)
from .features import PolyFeatures, degree_for, degree_rule, feature_count, taylor_error_bound
from .layers import AttentionGrads, CausalTransformer, attention_layer, attention_layer_grads
from .ops import lowrank_matmul, lowrank_matmul_t, rowwise_kron
from .tensor import (
    TensorAttention,
    export_tensor_attention,
    tensor_attention,
    tensor_attention_grads_ref,
    tensor_attention_ref,
)

__all__ = [
    "AttentionGrads",
    "CausalTransformer",
    "PolyFeatures",
    "TensorAttention",
    "attention_layer",
    "attention_layer_grads",
    "degree_for",
    "degree_rule",
    "export_tensor_attention",
    "feature_count",
    "lowrank_attention",
    "lowrank_attention_backward",
    "lowrank_attention_forward",
    "lowrank_matmul",
    "lowrank_matmul_t",
    "poly_attention_ref",
    "rowwise_kron",
    "softmax_attention_grads_ref",
    "softmax_attention_ref",
    "taylor_error_bound",
    "tensor_attention",
    "tensor_attention_grads_ref",
    "tensor_attention_ref",
]
