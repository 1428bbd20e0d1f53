"""Partitioning helpers shared by the TP layers, initialisation, tests and checkpoint conversion.

A tensor-parallel parameter is the rank's slice of a full (unpartitioned) tensor along
``partition_dim``. With ``stride`` s > 1 the full tensor is first cut into s equal chunks along that
dim and the rank takes its 1/world slice of *each* chunk, concatenated in chunk order. For the fused
``query_key_value`` weight (stride 3, rows [Q; K; V]) rank r therefore holds [Q_r; K_r; V_r]: the
rows of its own heads in each third, the layout of docs/model.md#tensor-parallel-partition and of
Megatron checkpoints.

Shape legend: w TP world size, s stride, n size of the partitioned dim (divisible by s * w).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "divide",
    "gather_tensor_shards",
    "get_tensor_model_parallel_rank_and_size",
    "set_tensor_model_parallel_attributes",
    "shard_tensor",
]


def divide(numerator: int, denominator: int) -> int:
    """``numerator // denominator``, raising ``ValueError`` unless it divides exactly."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def get_tensor_model_parallel_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) within ``group``; ``None`` means no tensor parallelism: (0, 1).

    Works without ``torch.distributed`` initialised when ``group`` is ``None``, so TP=1 modules are
    plain single-process PyTorch.
    """
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def set_tensor_model_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, partition_dim: int = -1, partition_stride: int = 1
) -> None:
    """Mark a parameter the Megatron way (DeepSpeed reads ``tensor_model_parallel`` for norms)."""
    param.tensor_model_parallel = is_parallel  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    param.partition_stride = partition_stride  # type: ignore[attr-defined]


def _check_partition(size: int, dim: int, stride: int, world_size: int) -> None:
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if size % (stride * world_size) != 0:
        raise ValueError(
            f"size {size} of dim {dim} is not divisible by stride {stride} * "
            f"tensor-parallel size {world_size}"
        )


def shard_tensor(
    full: torch.Tensor, dim: int, stride: int, rank: int, world_size: int
) -> torch.Tensor:
    """The rank's partition of ``full`` along ``dim`` (strided when ``stride`` > 1).

    Returns a new contiguous tensor (never a view of ``full``).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    _check_partition(full.size(dim), dim, stride, world_size)
    chunks = full.chunk(stride, dim=dim)  # s x [.., n/s, ..]
    pieces = [chunk.chunk(world_size, dim=dim)[rank] for chunk in chunks]  # s x [.., n/(s*w), ..]
    return torch.cat(pieces, dim=dim).contiguous()  # [.., n/w, ..]


def gather_tensor_shards(shards: Sequence[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of ``shard_tensor``: ``shards[r]`` is rank r's partition; returns the full tensor."""
    if len(shards) == 0:
        raise ValueError("gather_tensor_shards needs at least one shard")
    world_size = len(shards)
    shapes = {tuple(shard.shape) for shard in shards}
    if len(shapes) != 1:
        raise ValueError(f"shards must all have the same shape, got {sorted(shapes)}")
    if shards[0].size(dim) % stride != 0:
        raise ValueError(
            f"shard size {shards[0].size(dim)} of dim {dim} is not divisible by stride {stride}"
        )
    per_rank = [shard.chunk(stride, dim=dim) for shard in shards]  # w x s x [.., n/(s*w), ..]
    # Chunk-major order: all ranks' pieces of chunk 0, then of chunk 1, ...
    pieces = [per_rank[rank][chunk] for chunk in range(stride) for rank in range(world_size)]
    return torch.cat(pieces, dim=dim)  # [.., n, ..]
