"""GLM's input embedding with 2D positions and the tied LM head (docs/model.md#architecture,
docs/model.md#inputs-2d-positions-and-the-mask).

Shape legend: b batch, s sequence, h hidden, v padded vocab, w TP world size.

``h0 = word_embeddings[ids] + position_embeddings[pos] + block_position_embeddings[block_pos]``,
then embedding dropout. ``position_ids [b, 2, s]``: row 0 is the absolute position, row 1 the
block position (0 in Part A, 1.. inside each Part B span). With ``block_position_encoding=False``
row 1 is ignored and there is no block table. With sequence parallelism
(docs/parallelism.md#sequence-parallelism) ``h0`` is split along the sequence before the dropout,
each TP rank keeping ``[b, s/w, h]``, and the LM head gathers the sequence back.

The module layout reproduces the canonical names: the word table is ``word_embeddings`` at the top
and the position tables live under ``transformer`` (the official ``GPT2ParallelTransformer`` owns
them), so ``GLMEmbedding().state_dict()`` keys are canonical names, just like the full model's.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.kernels.matmul import linear
from megatron_glm.model.init import initialize_parameters
from megatron_glm.parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    get_rng_tracker,
    linear_with_sequence_gather,
    scatter_to_sequence_parallel_region,
    set_tensor_model_parallel_attributes,
)

logger = logging.getLogger(__name__)

__all__ = ["GLMEmbedding", "PositionTables", "embed", "parallel_lm_logits"]


class PositionTables(nn.Module):
    """The position tables (``max_sequence_length + 1`` rows each) and the embedding dropout;
    replicated over TP. The full model's ``transformer`` extends this with the layers."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        rows, h = config.max_sequence_length + 1, config.hidden_size
        self.position_embeddings = nn.Embedding(rows, h)
        self.block_position_encoding = config.block_position_encoding
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(rows, h)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        for param in self.parameters():
            set_tensor_model_parallel_attributes(param, False)


def embed(
    word_embeddings: VocabParallelEmbedding,
    tables: PositionTables,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """``input_ids [b, s]``, ``position_ids [b, 2, s]`` -> ``[b, s, h]`` (after dropout), or with
    ``sequence_parallel`` (and TP > 1) this TP rank's ``[b, s/w, h]`` slice of it."""
    hidden = word_embeddings(input_ids)  # [b, s, h], all-reduced over the vocab shards
    hidden = hidden + tables.position_embeddings(position_ids[:, 0])
    if tables.block_position_encoding:
        hidden = hidden + tables.block_position_embeddings(position_ids[:, 1])
    tp_group, tp_size = word_embeddings.tp_group, word_embeddings.tp_world_size
    if not sequence_parallel or tp_size == 1:
        return tables.embedding_dropout(hidden)
    s = hidden.shape[1]
    if s % tp_size:
        raise ValueError(
            f"sequence parallelism splits the sequence over the {tp_size} tensor-parallel ranks: "
            f"the sequence length {s} must be divisible by {tp_size}"
        )
    hidden = scatter_to_sequence_parallel_region(hidden, tp_group)  # [b, s/w, h]
    dropout = tables.embedding_dropout
    # The ranks now hold different positions: their masks must differ (the per-rank stream).
    drawing = dropout.training and dropout.p > 0.0
    with get_rng_tracker().fork() if drawing else contextlib.nullcontext():
        return dropout(hidden)


class GLMEmbedding(nn.Module):
    """First pipeline block: word + position + block-position embeddings, then dropout.

    Parameters: ``word_embeddings.weight`` (vocab-parallel, dim 0),
    ``transformer.position_embeddings.weight``, ``transformer.block_position_embeddings.weight``.
    """

    def __init__(
        self, config: GLMConfig, tp_group: dist.ProcessGroup | None = None, init: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        self.tp_group = tp_group
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size, tp_group
        )
        self.sequence_parallel = config.sequence_parallel and self.word_embeddings.tp_world_size > 1
        self.transformer = PositionTables(config)
        if init:
            initialize_parameters(self, config, "", tp_group)

    @property
    def word_embeddings_weight(self) -> nn.Parameter:
        """The table the tied LM head multiplies with (``[v/w, h]``)."""
        return self.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return embed(
            self.word_embeddings,
            self.transformer,
            input_ids,
            position_ids,
            self.sequence_parallel,
        )


def parallel_lm_logits(
    hidden: torch.Tensor,
    word_embeddings_weight: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Tied LM head: ``hidden [b, s, h]`` @ ``W [v/w, h]``^T -> vocab-parallel logits
    ``[b, s, v/w]`` (no bias). The copy makes the backward sum the hidden gradient over TP ranks,
    each of which only saw its vocab shard. With ``sequence_parallel`` ``hidden`` is this rank's
    ``[b, s/w, h]``, all-gathered for the product (and only the slice kept for backward, as in the
    column-parallel linears); the backward's reduce-scatter does that sum."""
    if sequence_parallel:
        return linear_with_sequence_gather(hidden, word_embeddings_weight, None, tp_group)
    hidden = copy_to_tensor_model_parallel_region(hidden, tp_group)
    return linear(hidden, word_embeddings_weight)  # [b, s, v/w]
