"""GLM pretraining as a task: blank-infilling samples of an indexed corpus, the masked token loss,
and validation loss per objective (docs/training.md).

Shape legend: b micro-batch, s sequence, v/w this rank's vocab shard.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.data.blank_infilling import OBJECTIVES
from megatron_glm.model import glm_loss
from megatron_glm.tasks.base import MicroBatch, Task, TaskData


class GLMPretraining(Task):
    """Autoregressive blank infilling over ``run.data`` (a ``RunConfig``)."""

    name = "pretraining"

    def __init__(self, run: Any) -> None:
        self.run = run
        self.input_length = run.data.input_length

    def build_data(self, groups: Any) -> TaskData:
        from megatron_glm.data.blank_infilling import BlankInfillingCollator
        from megatron_glm.data.glm_dataset import build_glm_datasets
        from megatron_glm.data.tokenizers import tokenizer_from_spec

        d, t, gbs = self.run.data, self.run.training, self.run.ds.train_batch_size
        tokenizer = tokenizer_from_spec(d.tokenizer_spec)
        # Only the splits this run reads: the test split never, the valid split with --eval-interval.
        validating = bool(t.eval_interval)
        splits = ("train", "valid") if validating else ("train",)
        num_samples = (t.train_iters * gbs, t.eval_iters * gbs if validating else 0, 0)
        # Rank 0 builds the sample-index caches first; the others then read them.
        if groups.rank != 0:
            dist.barrier()
        train_ds, valid_ds, _ = build_glm_datasets(d, tokenizer, num_samples, splits=splits)
        if groups.rank == 0:
            dist.barrier()
        collator = BlankInfillingCollator(d.infilling, tokenizer, d.input_length, d.seed)
        # the validation split is read from its start, --eval-iters global batches each time
        return TaskData(train_ds, valid_ds, collator, num_valid=t.eval_iters * gbs)

    def loss_units(self, mb: MicroBatch) -> torch.Tensor:
        return mb["loss_mask"].double().sum()

    def targets(self, mb: MicroBatch) -> tuple[torch.Tensor, ...]:
        objective = torch.tensor([OBJECTIVES.index(mb["objective"])])
        return mb["labels"], mb["loss_mask"], objective

    def loss(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
        normalizer: torch.Tensor,
    ) -> torch.Tensor:
        labels, loss_mask, _ = targets
        return glm_loss(logits, labels, loss_mask, tp_group, normalizer)

    def eval_stats(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """``[loss sum, loss tokens]`` per objective, in ``OBJECTIVES`` order."""
        labels, loss_mask, objective = targets
        stats = torch.zeros(len(OBJECTIVES), 2, dtype=torch.float64)
        row = int(objective.reshape(-1)[0])
        stats[row, 0] = float(glm_loss(logits, labels, loss_mask, tp_group, 1.0))
        stats[row, 1] = float(loss_mask.sum())
        return stats.reshape(-1)

    def _split(self, stats: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
        per = stats.reshape(len(OBJECTIVES), 2)
        seen = [(n, float(per[i, 0]), int(per[i, 1])) for i, n in enumerate(OBJECTIVES)]
        seen = [(n, s, c) for n, s, c in seen if c > 0]
        total_sum = sum(s for _, s, _ in seen)
        total_tokens = sum(c for _, _, c in seen)
        losses = {n: s / max(c, 1) for n, s, c in seen}
        losses["all"] = total_sum / max(total_tokens, 1)
        tokens = {n: c for n, _, c in seen}
        tokens["all"] = total_tokens
        return losses, tokens

    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        losses, _ = self._split(stats)
        return {f"loss_{name}": value for name, value in losses.items()}

    def log_validation(self, log: Any, iteration: int, stats: torch.Tensor) -> dict[str, float]:
        losses, tokens = self._split(stats)
        log.log_eval(iteration, losses, tokens)
        return {f"loss_{name}": value for name, value in losses.items()}
