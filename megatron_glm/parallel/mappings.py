"""Autograd-aware communication at the borders of tensor-parallel regions (Megatron's "f" and "g").

Each mapping is a pair of conjugate operations: what the forward does to activations, the backward
does the adjoint to gradients.

| mapping                                  | forward                  | backward                 |
|------------------------------------------|--------------------------|--------------------------|
| ``copy_to_tensor_model_parallel_region`` | identity                 | all-reduce (sum)         |
| ``reduce_from_tensor_model_parallel_region`` | all-reduce (sum)     | identity                 |
| ``scatter_to_tensor_model_parallel_region``  | keep own last-dim slice | all-gather last dim   |
| ``gather_from_tensor_model_parallel_region`` | all-gather last dim  | keep own last-dim slice  |

With ``group`` ``None`` or of size 1 every mapping returns its input unchanged (no autograd node),
so TP=1 code runs without ``torch.distributed``.

Shape legend: w TP world size, h last dim (full), h/w its per-rank slice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel.utils import divide, get_tensor_model_parallel_rank_and_size

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
]


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    # Reduce a copy: the caller's tensor (or autograd's grad buffer) may be used elsewhere.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    rank, world_size = get_tensor_model_parallel_rank_and_size(group)
    width = divide(x.size(-1), world_size)
    return x[..., rank * width : (rank + 1) * width].contiguous()  # [.., h/w]


def _gather_last_dim(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    _, world_size = get_tensor_model_parallel_rank_and_size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)  # [.., h]


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
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_last_dim(grad, ctx.group), None


def _is_parallel(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1


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
    return _ScatterToRegion.apply(x, group) if _is_parallel(group) else x


def gather_from_tensor_model_parallel_region(
    x: torch.Tensor, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Concatenate the ranks' last-dim slices in rank order; gradient is split back."""
    return _GatherFromRegion.apply(x, group) if _is_parallel(group) else x
