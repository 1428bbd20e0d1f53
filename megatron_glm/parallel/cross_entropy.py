"""Cross entropy over vocab-parallel logits, without gathering the full vocab on any rank.

Each rank holds the logits of its vocab slice ``[r*v/w, (r+1)*v/w)``. The loss per token is
``logsumexp(logits) - logits[label]``; both terms are assembled with all-reduces of ``[..]``-sized
tensors (the max, the sum of exponentials, the target logit) instead of ``[.., v]``.
Always computed in fp32: the inputs are cast inside, a few rows at a time, so fp16/bf16 logits keep
an exact-enough softmax (docs/model.md#loss) without an fp32 copy of the logits ever existing
whole. The backward is the closed form ``softmax - onehot(label)``, recomputed row block by row
block from the saved logits (in their own dtype) and two fp32 numbers per token, so no rank ever
materialises full-vocab gradients or fp32 logits.

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


# Rows per piece of the fp32 work: ~1 MB of fp32 temporaries at a time (2^18 elements), which stays
# in cache and never allocates a [t.., v/w] fp32 tensor.
_CHUNK_ELEMENTS = 1 << 18


def _chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _shifted_exp(logits: torch.Tensor, logits_max: torch.Tensor, rows: slice) -> torch.Tensor:
    """``exp(logits[rows] - max)`` in fp32 (a new tensor, whatever the logits' dtype)."""
    return torch.sub(logits[rows], logits_max[rows].unsqueeze(-1)).float().exp_()


def _row_max(logits: torch.Tensor) -> torch.Tensor:
    """Per-row max in fp32, ``[t]``: reduced on fp32 pieces (a bf16 max is not vectorised on CPU,
    and is 10x slower than converting a cache-sized piece and reducing that)."""
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for rows in _chunks(logits.shape[0], logits.shape[1]):
        out[rows] = logits[rows].float().amax(dim=-1)
    return out


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
        partition_vocab = logits_shard.size(-1)
        logits = logits_shard.reshape(-1, partition_vocab)  # [t, v/w], any float dtype
        flat_labels = labels.reshape(-1)  # [t]

        # Subtract the global max before exp(): exp of large logits would overflow.
        logits_max = _row_max(logits)  # [t] fp32
        if parallel:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)

        vocab_start = rank * partition_vocab
        not_here = (flat_labels < vocab_start) | (flat_labels >= vocab_start + partition_vocab)
        local_labels = (flat_labels - vocab_start).masked_fill(not_here, 0)  # [t]
        target_logit = logits.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).float()
        target_logit = (target_logit - logits_max).masked_fill(not_here, 0.0)  # [t] shifted

        # sum(exp(shifted)) a few rows at a time: no full-size fp32 copy of the logits.
        sum_exp = torch.empty_like(logits_max)
        for rows in _chunks(logits.shape[0], partition_vocab):
            sum_exp[rows] = _shifted_exp(logits, logits_max, rows).sum(dim=-1)
        if parallel:
            # One all-reduce for both sums (they are independent, the op is the same).
            packed = torch.stack([target_logit, sum_exp])  # [2, t]
            dist.all_reduce(packed, group=group)
            target_logit, sum_exp = packed[0], packed[1]

        loss = torch.log(sum_exp) - target_logit  # [t] fp32
        # The logits themselves (no copy: autograd keeps the input alive anyway for the caller's
        # graph) and two fp32 numbers per token are all backward needs.
        ctx.save_for_backward(logits, logits_max, sum_exp, not_here, local_labels)
        ctx.shard_shape = logits_shard.shape
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, logits_max, sum_exp, not_here, local_labels = ctx.saved_tensors
        grad_loss = grad_loss.reshape(-1).float()  # [t]
        own = (~not_here).float()  # [t]
        grad = torch.empty_like(logits)  # [t, v/w] in the logits' dtype
        for rows in _chunks(logits.shape[0], logits.shape[1]):
            # d loss / d logits = softmax - onehot(label); the onehot lives on the owning rank.
            piece = _shifted_exp(logits, logits_max, rows).div_(sum_exp[rows].unsqueeze(-1))
            piece.scatter_add_(-1, local_labels[rows].unsqueeze(-1), -own[rows].unsqueeze(-1))
            piece.mul_(grad_loss[rows].unsqueeze(-1))
            grad[rows] = piece
        return grad.view(ctx.shard_shape), None, None


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
