"""Cross entropy over vocab-parallel logits, without gathering the full vocab on any rank.

Each rank holds the logits of its vocab slice ``[r*v/w, (r+1)*v/w)``. The loss per token is
``logsumexp(logits) - logits[label]``; both terms are assembled with all-reduces of ``[..]``-sized
tensors (the max, the sum of exponentials, the target logit) instead of ``[.., v]``.
Always computed in fp32: the inputs are cast inside, so fp16/bf16 logits keep an exact-enough
softmax (docs/model.md#loss). The backward is the closed form ``softmax - onehot(label)``,
computed from the saved local softmax, so no rank ever materialises full-vocab gradients.

Labels must lie in ``[0, v)``: exclude tokens with the loss mask, not with an ignore index (under
TP an out-of-range label is owned by no rank and would silently give ``logsumexp``).

Shape legend: t any leading token dims (e.g. b, s), v full vocab, v/w this rank's vocab shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel.utils import get_tensor_model_parallel_rank_and_size

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits_shard: torch.Tensor,
        labels: torch.Tensor,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        rank, world_size = get_tensor_model_parallel_rank_and_size(group)
        parallel = world_size > 1
        logits = logits_shard.float()  # [t.., v/w]; a copy for low precision, aliased for fp32

        # Subtract the global max before exp(): exp of large logits would overflow.
        logits_max = logits.max(dim=-1).values  # [t..]
        if parallel:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)  # [t.., v/w], a new tensor

        partition_vocab = logits.size(-1)
        vocab_start = rank * partition_vocab
        not_here = (labels < vocab_start) | (labels >= vocab_start + partition_vocab)  # [t..]
        local_labels = (labels - vocab_start).masked_fill(not_here, 0)
        target_logit = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)  # [t..]
        target_logit = target_logit.masked_fill(not_here, 0.0)

        exp_logits = shifted.exp_()  # in place: `shifted` is not needed any more
        sum_exp = exp_logits.sum(dim=-1)  # [t..]
        if parallel:
            # One all-reduce for both sums (they are independent, the op is the same).
            packed = torch.stack([target_logit, sum_exp])  # [2, t..]
            dist.all_reduce(packed, group=group)
            target_logit, sum_exp = packed[0], packed[1]

        loss = torch.log(sum_exp) - target_logit  # [t..] fp32
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))  # [t.., v/w]
        ctx.input_dtype = logits_shard.dtype
        ctx.save_for_backward(softmax, not_here, local_labels)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, not_here, local_labels = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(label); the onehot lives on the owning rank only.
        grad = softmax.clone()  # [t.., v/w]
        own = (~not_here).to(grad.dtype).unsqueeze(-1)  # [t.., 1]
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -own)
        grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.input_dtype), None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor, labels: torch.Tensor, tp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Per-token cross entropy ``[t..]`` (fp32) of vocab-parallel logits ``[t.., v/w]``.

    With ``tp_group`` ``None`` (or size 1) it equals ``F.cross_entropy(logits.float(), labels,
    reduction='none')`` over the last dim. A collective over ``tp_group`` otherwise: every TP rank
    must call it with the same ``labels``.
    """
    if logits_shard.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
            f"{tuple(logits_shard.shape[:-1])} (logits {tuple(logits_shard.shape)})"
        )
    return _VocabParallelCrossEntropy.apply(logits_shard, labels, tp_group)
