"""Tensor parallelism and process groups: topology, TP layers, mappings, vocab-parallel CE, RNG.

See docs/parallelism.md. Nothing here reads a global rank: layers take a ``tp_group`` (``None`` for
TP=1, a plain single-process module), groups come from one ``ParallelTopology``.
"""

from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_full_parameters,
    linear_with_sequence_gather,
    load_full_parameters,
    sum_sequence_parallel_gradients,
)
from megatron_glm.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_glm.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    checkpoint,
    get_all_rng_states,
    get_rng_tracker,
    model_parallel_seed,
    set_all_rng_states,
)
from megatron_glm.parallel.topology import ParallelCoordinates, ParallelGroups, ParallelTopology
from megatron_glm.parallel.utils import (
    divide,
    gather_tensor_shards,
    get_tensor_model_parallel_rank_and_size,
    set_tensor_model_parallel_attributes,
    shard_tensor,
)

__all__ = [
    "MODEL_PARALLEL_RNG",
    "ColumnParallelLinear",
    "ParallelCoordinates",
    "ParallelGroups",
    "ParallelTopology",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "checkpoint",
    "copy_to_tensor_model_parallel_region",
    "divide",
    "gather_from_tensor_model_parallel_region",
    "gather_full_parameters",
    "gather_tensor_shards",
    "get_all_rng_states",
    "get_rng_tracker",
    "get_tensor_model_parallel_rank_and_size",
    "linear_with_sequence_gather",
    "load_full_parameters",
    "model_parallel_seed",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "set_all_rng_states",
    "set_tensor_model_parallel_attributes",
    "shard_tensor",
    "sum_sequence_parallel_gradients",
    "vocab_parallel_cross_entropy",
]
