"""The GLM model: embeddings with 2D positions, attention, MLP, layers, tied LM head, init, loss.

See docs/model.md.
"""

from megatron_glm.model.embedding import (
    GLMEmbedding,
    PositionTables,
    embed,
    parallel_lm_logits,
)
from megatron_glm.model.glm import GLMModel, GLMTransformer, check_tp_divisibility, validate_inputs
from megatron_glm.model.init import (
    full_initial_value,
    init_std,
    initialize_parameters,
    param_groups_for_weight_decay,
    stable_hash,
)
from megatron_glm.model.layer import (
    GLMLayer,
    ParallelMLP,
    ParallelSelfAttention,
    make_replicated_layer_norm,
)
from megatron_glm.model.loss import glm_loss

__all__ = [
    "GLMEmbedding",
    "GLMLayer",
    "GLMModel",
    "GLMTransformer",
    "ParallelMLP",
    "ParallelSelfAttention",
    "PositionTables",
    "check_tp_divisibility",
    "embed",
    "full_initial_value",
    "glm_loss",
    "init_std",
    "initialize_parameters",
    "make_replicated_layer_norm",
    "param_groups_for_weight_decay",
    "parallel_lm_logits",
    "stable_hash",
    "validate_inputs",
]
