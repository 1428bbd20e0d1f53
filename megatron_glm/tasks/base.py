"""What a task gives the trainer: datasets, collation, the loss and the evaluation metrics.

Shape legend: b micro-batch rows, s sequence, v/w this rank's vocab shard.

The loop (``megatron_glm.training.loop.train``) owns the order of things (resume, iterations,
validation, checkpoints); a ``Task`` owns the decisions that depend on the data: what a sample is,
what the loss of a micro-batch is and what a validation reports. GLM pretraining
(``megatron_glm.tasks.pretraining``) is one task; cloze classification and seq2seq finetuning
(``megatron_glm.tasks.cloze``, ``megatron_glm.tasks.seq2seq``) are others, and all of them run on
the same engine, layouts, checkpoints and exact resume.

A micro-batch is the collator's dict; the model reads its ``tokens [b, s]``, ``position_ids
[b, 2, s]`` and ``sep [b]`` and the task reads the rest through ``targets`` (a tuple of tensors:
it is what DeepSpeed's pipeline hands to the last stage's loss function). The loss of a
micro-batch is a sum over its *loss units* (tokens for language modelling, examples for
classification) divided by the normaliser the trainer passes in (docs/training.md, loss
normalisation), so gradient accumulation and data parallelism average over every unit of the
global batch.

Validation is a sum: ``eval_stats`` turns one micro-batch into a fixed-size float64 vector (loss
sums, counts, a confusion matrix); the trainer adds the vectors of all micro-batches and all
data-parallel ranks, and ``metrics`` turns the total into named numbers.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MicroBatch = dict[str, Any]
MODEL_INPUTS = ("tokens", "position_ids", "sep")


@dataclass(frozen=True)
class TaskData:
    """The datasets of a run. ``train`` and ``valid`` are indexed by global sample index; the
    training one is endless (a pure function of the index, epochs included), the validation one
    covers each example once (``num_valid`` real examples, padded by the loader)."""

    train: Any
    valid: Any | None
    collator: Any
    num_valid: int = 0


class Task(abc.ABC):
    """One kind of training run. Subclasses set ``name``, ``input_length`` (every micro-batch is
    ``[rows, input_length]``) and ``best_metric`` (the validation metric that picks the best
    checkpoint; ``None`` keeps none)."""

    name: str
    input_length: int
    best_metric: str | None = None
    higher_is_better: bool = True  # of best_metric
    eval_micro_batch_size: int | None = None  # None: the training micro-batch size

    @abc.abstractmethod
    def build_data(self, groups: Any) -> TaskData:
        """Datasets and collator; every rank calls it (collectively, when caches are built)."""

    @abc.abstractmethod
    def loss_units(self, mb: MicroBatch) -> torch.Tensor:
        """How many units the loss of ``mb`` sums over (the normaliser counts these)."""

    @abc.abstractmethod
    def targets(self, mb: MicroBatch) -> tuple[torch.Tensor, ...]:
        """The tensors the loss reads besides the logits (still on the CPU)."""

    @abc.abstractmethod
    def loss(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
        normalizer: torch.Tensor,
    ) -> torch.Tensor:
        """``sum over loss units / normalizer`` (fp32 scalar) from vocab-parallel ``logits
        [b, s, v/w]``."""

    @abc.abstractmethod
    def eval_stats(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """One micro-batch's contribution to a validation: a float64 vector, summed."""

    @abc.abstractmethod
    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        """Named numbers from the summed ``eval_stats``."""

    def log_validation(self, log: Any, iteration: int, stats: torch.Tensor) -> dict[str, float]:
        """Write one validation to the run's ``TrainLogger``; returns its metrics."""
        metrics = self.metrics(stats)
        log.log_metrics(iteration, "valid", metrics)
        return metrics
