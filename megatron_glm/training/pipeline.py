"""GLM as a DeepSpeed ``PipelineModule``: M's blocks wrapped as pipeline layers.

Shape legend: b micro-batch, s sequence, h hidden, v/w this rank's vocab shard.

Stage boundaries carry the activation tuple ``(hidden [b,s,h], position_ids [b,2,s], sep [b])``;
only ``hidden`` is floating point, so it is the one tensor DeepSpeed sends a gradient back for.
The first stage takes ``(tokens, position_ids, sep)``, the last stage's loss function takes the
labels tuple ``(*task targets, normalizer [1])`` (for pretraining the targets are ``labels [b,s],
loss_mask [b,s]`` and the objective).

Layer list: ``EmbeddingPipe`` (tied, key ``word_embeddings``), ``num_layers`` x ``LayerPipe``,
``FinalLayerNormPipe``, then the tied head (the same key, forward = ``parallel_lm_logits``).
Where each canonical parameter lives in that list is this module's rule (``pipeline_location``,
``canonical_name``, ``module_canonical_name``); DeepSpeed's per-layer checkpoint files, the
layout-free state and ``--load-pretrained`` all map names through it.
Each block initialises itself from ``(seed, canonical name)``, so a stage holds exactly the
weights the unpartitioned ``GLMModel`` has; DeepSpeed also broadcasts the tied table from the
first stage. The last stage's copy of the embedding keeps only the word table (the position tables
are dropped there: they would be parameters without gradients). Activation checkpointing wraps
each ``LayerPipe`` with ``megatron_glm.parallel.random.checkpoint`` (RNG-tracked recompute), not
DeepSpeed's own checkpointing, so every layout recomputes under the same RNG rules.

With sequence parallelism (docs/parallelism.md#sequence-parallelism) ``hidden`` is each TP rank's
``[b, s/w, h]`` slice from the embedding's output to the head's gather, stage boundaries included
(the run configuration turns off DeepSpeed's splitting of stage outputs over the TP ranks, which
takes them to be replicated).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.kernels import prepare_attention_mask
from megatron_glm.model import GLMEmbedding, GLMLayer, make_replicated_layer_norm
from megatron_glm.model import parallel_lm_logits as _lm_logits
from megatron_glm.parallel import sum_sequence_parallel_gradients
from megatron_glm.parallel.random import checkpoint

Activations = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TIED_KEY = "word_embeddings"
# where PipelineModule registers the tied embedding's parameters (its ModuleDict ``tied_modules``)
TIED_MODULE_PREFIX = f"tied_modules.{TIED_KEY}."
EMBEDDING_LAYER = 0  # the embedding: the word table and the position tables
_LAYERS = "transformer.layers."
_TRANSFORMER = "transformer."  # FinalLayerNormPipe holds ``final_layernorm.*`` of GLMTransformer


def final_layernorm_layer(num_layers: int) -> int:
    """Pipeline layer index of ``FinalLayerNormPipe``."""
    return num_layers + 1


def head_layer(num_layers: int) -> int:
    """Pipeline layer index of the tied head (its parameters are layer 0's word table)."""
    return num_layers + 2


def pipeline_location(canonical: str, num_layers: int) -> tuple[int, str]:
    """The pipeline layer holding canonical parameter ``canonical`` and its name inside that
    layer's module: ``transformer.layers.{i}.*`` is layer ``i + 1``, ``transformer.final_layernorm.*``
    layer ``num_layers + 1`` (as ``final_layernorm.*``), everything else (the word table and the
    position tables) the embedding, layer 0, under its canonical name. The tied head's copy of the
    word table (layer ``num_layers + 2``) is not reported: layer 0 owns it."""
    if canonical.startswith(_LAYERS):
        number, local = canonical[len(_LAYERS) :].split(".", 1)
        if not 0 <= int(number) < num_layers:
            raise ValueError(f"{canonical!r}: a model of {num_layers} layers has no layer {number}")
        return int(number) + 1, local
    if canonical.startswith(_TRANSFORMER + "final_layernorm."):
        return final_layernorm_layer(num_layers), canonical[len(_TRANSFORMER) :]
    return EMBEDDING_LAYER, canonical


def canonical_name(index: int, local: str, num_layers: int) -> str:
    """Inverse of ``pipeline_location``: the canonical name of parameter ``local`` of pipeline
    layer ``index`` (the tied head's names are those of layer 0)."""
    if 1 <= index <= num_layers:
        return f"{_LAYERS}{index - 1}.{local}"
    if index == final_layernorm_layer(num_layers):
        return _TRANSFORMER + local
    if index in (EMBEDDING_LAYER, head_layer(num_layers)):
        return local
    raise ValueError(f"a pipeline of {num_layers} transformer layers has no layer {index}")


def module_canonical_name(module_name: str, num_layers: int) -> str:
    """The canonical name of a ``PipelineModule`` parameter or state-dict entry: DeepSpeed
    registers each layer under its index (``"3.attention.dense.weight"``) and the tied embedding,
    on the first and on the last stage, under ``tied_modules.word_embeddings.``."""
    if module_name.startswith(TIED_MODULE_PREFIX):
        return canonical_name(EMBEDDING_LAYER, module_name[len(TIED_MODULE_PREFIX) :], num_layers)
    index, _, local = module_name.partition(".")
    # layer 0 and the head are tied modules; a numbered one of those indices is not ours
    if index.isdigit() and 1 <= int(index) <= final_layernorm_layer(num_layers):
        return canonical_name(int(index), local, num_layers)
    raise ValueError(f"pipeline parameter {module_name!r} has no canonical name")


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
    """The tied head on the last stage: ``[b, s, h]`` (``[b, s/w, h]`` under sequence
    parallelism) -> vocab-parallel logits ``[b, s, v/w]``."""
    return _lm_logits(
        hidden, embedding.word_embeddings_weight, embedding.tp_group, embedding.sequence_parallel
    )


class LayerPipe(GLMLayer):
    """One transformer layer on ``(hidden, position_ids, sep)``; RNG-tracked recompute if asked."""

    def __init__(
        self, config: GLMConfig, layer_number: int, tp_group: dist.ProcessGroup | None
    ) -> None:
        super().__init__(config, layer_number, tp_group)
        self.checkpoint_activations = config.checkpoint_activations
        self.attention_backend = config.attention_backend
        self.dropout_active = config.attention_dropout > 0.0
        # under sequence parallelism ``hidden`` holds 1/w of the sequence attention sees
        self.sequence_shards = dist.get_world_size(tp_group) if self.sequence_parallel else 1
        if config.sequence_parallel:
            sum_sequence_parallel_gradients(self, tp_group)

    def _run(self, hidden: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        s = hidden.shape[1] * self.sequence_shards
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

    def __init__(self, config: GLMConfig, tp_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.final_layernorm = make_replicated_layer_norm(config)
        if config.sequence_parallel:
            sum_sequence_parallel_gradients(self, tp_group)

    def forward(self, inputs: Activations) -> torch.Tensor:
        return self.final_layernorm(inputs[0])


class PipelineLoss:
    """The last stage's loss function: the task's loss (``megatron_glm.tasks.base.Task``) of the
    labels tuple ``(*targets, normalizer)``; while ``records`` is a list, each micro-batch's
    ``eval_stats`` is appended to it (validation reads them back)."""

    def __init__(self, task: Any, tp_group: dist.ProcessGroup | None) -> None:
        self.task = task
        self.tp_group = tp_group
        self.records: list[torch.Tensor] | None = None

    def __call__(self, logits: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        *targets, normalizer = labels
        if self.records is not None:
            self.records.append(self.task.eval_stats(logits, targets, self.tp_group))
        return self.task.loss(logits, targets, self.tp_group, normalizer.reshape(()))


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
        LayerSpec(FinalLayerNormPipe, config, tp_group),
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
    assert len(specs) == head_layer(config.num_layers) + 1  # the indices of pipeline_location
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
