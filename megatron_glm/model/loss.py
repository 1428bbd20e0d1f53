"""The GLM loss (docs/model.md#loss): masked vocab-parallel cross entropy in fp32.

Shape legend: b batch, s sequence, v/w this rank's vocab shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy

__all__ = ["glm_loss"]


def glm_loss(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    normalizer: float | torch.Tensor,
) -> torch.Tensor:
    """``sum(ce(logits [b,s,v/w], labels [b,s]) * loss_mask [b,s]) / normalizer`` as an fp32 scalar.

    The caller picks ``normalizer``: the number of loss tokens in the whole global batch (the
    default of docs/model.md#loss, so every layout computes the same loss), or, for the official
    per-micro-batch mean, this micro-batch's ``loss_mask.sum()`` times the number of micro-batches
    and data-parallel ranks averaged over.
    """
    if logits_shard.dim() != 3 or labels.shape != logits_shard.shape[:2]:
        raise ValueError(
            f"logits must be [b, s, v/w] and labels [b, s]; got logits "
            f"{tuple(logits_shard.shape)}, labels {tuple(labels.shape)}"
        )
    if loss_mask.shape != labels.shape:
        raise ValueError(
            f"loss_mask {tuple(loss_mask.shape)} must match labels {tuple(labels.shape)}"
        )
    if not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
        raise ValueError(f"normalizer must be positive, got {normalizer}")
    ce = vocab_parallel_cross_entropy(logits_shard, labels, tp_group)  # [b, s] fp32, cast inside
    return (ce * loss_mask.float()).sum() / normalizer
