"""Attention backends and fused ops, each with an eager reference (see docs/model.md)."""

from megatron_glm.kernels.attention import (
    BACKENDS,
    PreparedMask,
    allowed_mask,
    attention,
    flex_available,
    prepare_attention_mask,
    resolve_backend,
)
from megatron_glm.kernels.fused import (
    bias_dropout_add,
    bias_dropout_add_reference,
    bias_gelu,
    bias_gelu_reference,
)
from megatron_glm.kernels.layernorm import apex_layer_norm_class, make_layer_norm

__all__ = [
    "BACKENDS",
    "PreparedMask",
    "allowed_mask",
    "apex_layer_norm_class",
    "attention",
    "bias_dropout_add",
    "bias_dropout_add_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "flex_available",
    "make_layer_norm",
    "prepare_attention_mask",
    "resolve_backend",
]
