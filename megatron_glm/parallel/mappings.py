"""Autograd-aware communication at the borders of tensor-parallel regions (Megatron's "f" and "g").

Each mapping is a pair of conjugate operations: what the forward does to activations, the backward
does the adjoint to gradients.

| mapping                                  | forward                  | backward                 |
|------------------------------------------|--------------------------|--------------------------|
| ``copy_to_tensor_model_parallel_region`` | identity                 | all-reduce (sum)         |
| ``reduce_from_tensor_model_parallel_region`` | all-reduce (sum)     | identity                 |
| ``scatter_to_tensor_model_parallel_region``  | keep own last-dim slice | all-gather last dim   |
| ``gather_from_tensor_model_parallel_region`` | all-gather last dim  | keep own last-dim slice  |
| ``scatter_to_sequence_parallel_region``      | keep own sequence slice | all-gather sequence   |
| ``reduce_scatter_to_sequence_parallel_region`` | reduce-scatter sequence | all-gather sequence |

The last two are sequence parallelism's (docs/parallelism.md#sequence-parallelism): activations
``[b, s, h]`` are split along the sequence (dim 1, ``SEQUENCE_DIM``), rank r holding positions
``[r*s/w, (r+1)*s/w)``. The way into a TP region from there (all-gather forward, reduce-scatter
backward) is ``linear_with_sequence_gather`` (megatron_glm/parallel/layers.py) rather than a
mapping, so that only the slice is kept for backward. ``all_reduce_sum``, ``gather_sequence`` and
``reduce_scatter_sequence`` are plain collectives (no autograd) for code that schedules its own
backward: that linear and the gradient hooks of ``sum_sequence_parallel_gradients``.

With ``group`` ``None`` or of size 1 every mapping returns its input unchanged (no autograd node),
so TP=1 code runs without ``torch.distributed``.

Shape legend: w TP world size, h last dim (full), h/w its per-rank slice, b batch, s sequence
(full), s/w its per-rank slice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel.utils import divide, get_tensor_model_parallel_rank_and_size

__all__ = [
    "SEQUENCE_DIM",
    "all_reduce_sum",
    "copy_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "gather_sequence",
    "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_sequence",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region",
]

SEQUENCE_DIM = 1  # of the model's [b, s, h] activations


def _is_parallel(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    # Reduce a copy: the caller's tensor (or autograd's grad buffer) may be used elsewhere.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    rank, world_size = get_tensor_model_parallel_rank_and_size(group)
    width = divide(x.size(dim), world_size)
    return x.narrow(dim, rank * width, width).contiguous()  # [.., n/w, ..]


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    _, world_size = get_tensor_model_parallel_rank_and_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)  # [.., n, ..]


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    rank, world_size = get_tensor_model_parallel_rank_and_size(group)
    divide(x.size(dim), world_size)  # a clear error instead of unequal chunks
    chunks = [chunk.contiguous() for chunk in x.chunk(world_size, dim=dim)]
    out = torch.empty_like(chunks[rank])
    dist.reduce_scatter(out, chunks, group=group)
    return out  # [.., n/w, ..], summed over ranks


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``, in a new tensor (no autograd)."""
    return _all_reduce(x, group) if _is_parallel(group) else x


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[b, s/w, ..]`` -> ``[b, s, ..]``: the ranks' slices in rank order (no autograd)."""
    return _gather(x, SEQUENCE_DIM, group) if _is_parallel(group) else x


def reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``[b, s, ..]`` -> ``[b, s/w, ..]``: the sum over ranks of this rank's slice (no autograd)."""
    return _reduce_scatter(x, SEQUENCE_DIM, group) if _is_parallel(group) else x


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _split(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather(grad, SEQUENCE_DIM, ctx.group), None


def copy_to_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, gradient summed over ranks."""
    return _CopyToRegion.apply(x, group) if _is_parallel(group) else x


def reduce_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Leave a TP region by summing the ranks' partial results; gradient passes through."""
    return _ReduceFromRegion.apply(x, group) if _is_parallel(group) else x


def scatter_to_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Keep this rank's slice of the last dim (which must divide by the TP size)."""
    return _ScatterToRegion.apply(x, group, -1) if _is_parallel(group) else x


def gather_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Concatenate the ranks' last-dim slices in rank order; gradient is split back."""
    return _GatherFromRegion.apply(x, group, -1) if _is_parallel(group) else x


def scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Enter the sequence-parallel region: ``[b, s, ..]`` -> this rank's ``[b, s/w, ..]``; the
    gradient slices are all-gathered back (every rank held the full, replicated input)."""
    return _ScatterToRegion.apply(x, group, SEQUENCE_DIM) if _is_parallel(group) else x


def reduce_scatter_to_sequence_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Leave a TP region for the sequence-parallel one: sum the ranks' partial ``[b, s, ..]`` and
    keep this rank's ``[b, s/w, ..]`` (what all-reduce then slicing gives, with half the traffic);
    the gradient slices are all-gathered back."""
    return _ReduceScatterToSequenceRegion.apply(x, group) if _is_parallel(group) else x
