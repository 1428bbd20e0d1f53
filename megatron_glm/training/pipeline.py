"""GLM as a DeepSpeed ``PipelineModule``: M's blocks wrapped as pipeline layers.

Shape legend: b micro-batch, s sequence, h hidden, v/w this rank's vocab shard.

Stage boundaries carry the activation tuple ``(hidden [b,s,h], position_ids [b,2,s], sep [b])``;
only ``hidden`` is floating point, so it is the one tensor DeepSpeed sends a gradient back for.
The first stage takes ``(tokens, position_ids, sep)``, the last stage's loss function takes the
labels tuple ``(labels [b,s], loss_mask [b,s], normalizer [1])``.

Layer list: ``EmbeddingPipe`` (tied, key ``word_embeddings``), ``num_layers`` x ``LayerPipe``,
``FinalLayerNormPipe``, then the tied head (the same key, forward = ``parallel_lm_logits``).
Each block initialises itself from ``(seed, canonical name)``, so a stage holds exactly the
weights the unpartitioned ``GLMModel`` has; DeepSpeed also broadcasts the tied table from the
first stage. The last stage's copy of the embedding keeps only the word table (the position tables
are dropped there: they would be parameters without gradients). Activation checkpointing wraps
each ``LayerPipe`` with ``megatron_glm.parallel.random.checkpoint`` (RNG-tracked recompute), not
DeepSpeed's own checkpointing, so every layout recomputes under the same RNG rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.kernels import prepare_attention_mask
from megatron_glm.model import GLMEmbedding, GLMLayer, glm_loss, make_replicated_layer_norm
from megatron_glm.model import parallel_lm_logits as _lm_logits
from megatron_glm.parallel.random import checkpoint

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TIED_KEY = "word_embeddings"


class EmbeddingPipe(GLMEmbedding):
    """First stage: ``(tokens, position_ids, sep)`` -> ``(hidden, position_ids, sep)``.

    ``head_only=True`` builds the last stage's copy: just the tied word table.
    """

    def __init__(
        self, config: GLMConfig, tp_group: dist.ProcessGroup | None, head_only: bool = False
    ) -> None:
        super().__init__(config, tp_group)
        self.tp_group = tp_group
        if head_only:
            del self.transformer

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        tokens, position_ids, sep = inputs
        hidden = super().forward(tokens, position_ids)  # [b, s, h]
        return hidden, position_ids, sep


def lm_head_forward(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The tied head on the last stage: ``[b, s, h]`` -> vocab-parallel logits ``[b, s, v/w]``."""
    return _lm_logits(hidden, embedding.word_embeddings_weight, embedding.tp_group)


class LayerPipe(GLMLayer):
    """One transformer layer on ``(hidden, position_ids, sep)``; RNG-tracked recompute if asked."""

    def __init__(
        self, config: GLMConfig, layer_number: int, tp_group: dist.ProcessGroup | None
    ) -> None:
        super().__init__(config, layer_number, tp_group)
        self.checkpoint_activations = config.checkpoint_activations
        self.attention_backend = config.attention_backend
        self.dropout_active = config.attention_dropout > 0.0

    def _run(self, hidden: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        s = hidden.shape[1]
        mask = prepare_attention_mask(
            sep, s, s, self.attention_backend, self.training and self.dropout_active
        )
        return GLMLayer.forward(self, hidden, sep, mask)

    def forward(self, inputs: Activations) -> Activations:  # type: ignore[override]
        hidden, position_ids, sep = inputs
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            hidden = checkpoint(self._run, hidden, sep)
        else:
            hidden = self._run(hidden, sep)
        return hidden, position_ids, sep


class FinalLayerNormPipe(nn.Module):
    """``transformer.final_layernorm``: ``(hidden, position_ids, sep)`` -> ``hidden``."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        self.final_layernorm = make_replicated_layer_norm(config)

    def forward(self, inputs: Activations) -> torch.Tensor:
        return self.final_layernorm(inputs[0])


class PipelineLoss:
    """The last stage's loss function; optionally records ``(loss, loss tokens)`` per micro-batch
    (validation reads them back to split the loss by objective)."""

    def __init__(self, tp_group: dist.ProcessGroup | None) -> None:
        self.tp_group = tp_group
        self.records: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        target, loss_mask, normalizer = labels
        loss = glm_loss(logits, target, loss_mask, self.tp_group, normalizer.reshape(()))
        if self.records is not None:
            self.records.append((loss.detach(), loss_mask.detach().float().sum()))
        return loss


def build_pipeline_module(config: GLMConfig, groups: Any, loss_fn: Callable[..., Any]) -> Any:
    """A ``PipelineModule`` over the topology of ``groups`` (a ``ParallelGroups``)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    tp_group = groups.tp_group if groups.tp_size > 1 else None
    specs: list[Any] = [
        TiedLayerSpec(
            TIED_KEY, EmbeddingPipe, config, tp_group, tied_weight_attr=["word_embeddings.weight"]
        ),
    ]
    specs += [LayerSpec(LayerPipe, config, i, tp_group) for i in range(config.num_layers)]
    specs += [
        LayerSpec(FinalLayerNormPipe, config),
        TiedLayerSpec(
            TIED_KEY,
            EmbeddingPipe,
            config,
            tp_group,
            head_only=True,
            forward_fn=lm_head_forward,
            tied_weight_attr=["word_embeddings.weight"],
        ),
    ]
    # no_grad: the constructor broadcasts the tied table in place; under autograd that in-place
    # collective on a parameter would be recorded (and warned about) in every backward pass.
    with torch.no_grad():
        return PipelineModule(
            layers=specs,
            loss_fn=loss_fn,
            topology=groups.topology.to_deepspeed(),
            # balance the transformer layers; the embedding and head ride on the end stages
            partition_method="type:LayerPipe",
            activation_checkpoint_interval=0,
        )
