"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Parameters are allocated with ``torch.empty`` at their *partition* shape and carry Megatron's
attributes ``tensor_model_parallel``, ``partition_dim`` and ``partition_stride``; replicated ones
have ``tensor_model_parallel=False``. The model initialises them (full tensor from a seeded
generator, then ``shard_tensor``); ``load_full_parameters`` does that for a whole module from a
full state dict, ``gather_full_parameters`` is its inverse. With ``tp_group=None`` (or a group of
size 1) every layer is a plain module computing exactly what ``nn.Linear``/``nn.Embedding`` do, and
needs no ``torch.distributed``.

``sequence_parallel=True`` (docs/parallelism.md#sequence-parallelism) makes the linears take and
give activations split along the sequence: a column-parallel layer all-gathers its ``[b, s/w, i]``
input (and reduce-scatters the input gradient), a row-parallel one reduce-scatters its output to
``[b, s/w, o]`` instead of all-reducing it. Replicated parameters applied to such sequence slices
need ``sum_sequence_parallel_gradients``.

Shape legend: w TP world size, i input features, o output features, v vocab size, h hidden,
b batch, s sequence.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_glm.kernels.matmul import linear, linear_forward, matmul, matmul_tn
from megatron_glm.parallel.mappings import (
    all_reduce_sum,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    gather_sequence,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_sequence,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_glm.parallel.utils import (
    gather_tensor_shards,
    get_tensor_model_parallel_rank_and_size,
    set_tensor_model_parallel_attributes,
    shard_tensor,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "gather_full_parameters",
    "linear_with_sequence_gather",
    "load_full_parameters",
    "sum_sequence_parallel_gradients",
]


def _partition_size(full: int, world_size: int, stride: int, what: str) -> int:
    if full % (world_size * stride) != 0:
        detail = f" * stride {stride}" if stride > 1 else ""
        raise ValueError(
            f"{what} {full} is not divisible by the tensor-parallel size {world_size}{detail}"
        )
    return full // world_size


def _new_parameter(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str | None,
    partition_dim: int | None,
    stride: int = 1,
) -> nn.Parameter:
    """An uninitialised parameter (the model fills it) with Megatron's TP attributes: split along
    ``partition_dim``, or replicated over TP ranks when that is ``None``."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
    if partition_dim is None:
        set_tensor_model_parallel_attributes(param, False)
    else:
        set_tensor_model_parallel_attributes(param, True, partition_dim, stride)
    return param


class _LinearWithSequenceGather(torch.autograd.Function):
    """``F.linear(all-gather(x), weight, bias)`` over the sequence, keeping only the ``[b, s/w, i]``
    shard for backward: the gathered ``[b, s, i]`` input is what the weight gradient needs, and
    gathering it again in backward is what makes sequence parallelism save that memory (Korthikanti
    et al. 2022, section 4.2.2)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        ctx.group = group
        ctx.save_for_backward(x, weight)
        return linear_forward(gather_sequence(x, group), weight, bias)  # [b, s, o/w]

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        # Under autocast the forward's matmul ran in the autocast dtype, which the output gradient
        # has: compute in it (as autocast's own linear backward does); autograd casts each result
        # to its input's dtype.
        compute = grad.dtype
        grad_x = grad_weight = grad_bias = None
        if need_x:
            # each rank holds the gradient of its o/w outputs only: sum, and keep this rank's slice
            grad_x = reduce_scatter_sequence(matmul(grad, weight.to(compute)), ctx.group)
        if need_weight:
            full = gather_sequence(x, ctx.group).to(compute)  # [b, s, i]
            grad_weight = matmul_tn(grad, full)  # [o/w, i]
        if need_bias:
            grad_bias = grad.flatten(0, -2).sum(dim=0)  # [o/w]
        return grad_x, grad_weight, grad_bias, None


def linear_with_sequence_gather(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """``F.linear`` of this rank's sequence slice ``x [b, s/w, i]`` all-gathered to ``[b, s, i]``,
    keeping only the slice for backward (gathered again there); the input gradient is summed over
    the ranks and split back (reduce-scatter). Plain ``F.linear`` without TP."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return linear(x, weight, bias)
    return _LinearWithSequenceGather.apply(x, weight, bias, tp_group)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A [o, i]`` split along o (dim 0): rank r computes ``o/w`` outputs.

    The input is replicated (its gradient is summed over TP ranks), or with
    ``sequence_parallel=True`` split along the sequence (dim 1) and all-gathered here (its gradient
    reduce-scattered). ``gather_output=True`` returns the full ``o`` outputs in canonical order
    (strided partitions are re-interleaved, so a stride-3 QKV output is [Q; K; V] as in the
    unpartitioned layer). ``skip_bias_add=True`` returns ``(x A_r^T, b_r)`` so the caller can fuse
    the bias into what follows (bias + GeLU).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        tp_group: dist.ProcessGroup | None = None,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        skip_bias_add: bool = False,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if gather_output and skip_bias_add:
            raise ValueError(
                "ColumnParallelLinear: gather_output=True with skip_bias_add=True would return a "
                "gathered output with a partitioned bias; choose one"
            )
        self.input_size = input_size
        self.output_size = output_size
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.stride = stride
        self.skip_bias_add = skip_bias_add
        self.tp_rank, self.tp_world_size = get_tensor_model_parallel_rank_and_size(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_world_size > 1
        self.output_size_per_partition = _partition_size(
            output_size, self.tp_world_size, stride, "ColumnParallelLinear output_size"
        )
        self.weight = _new_parameter(
            (self.output_size_per_partition, input_size), params_dtype, device, 0, stride
        )  # [o/w, i]
        if bias:
            self.bias = _new_parameter(
                (self.output_size_per_partition,), params_dtype, device, 0, stride
            )  # [o/w]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        if self.sequence_parallel:
            out = linear_with_sequence_gather(x, self.weight, bias, self.tp_group)  # [b, s, o/w]
        else:
            x = copy_to_tensor_model_parallel_region(x, self.tp_group)  # [.., i]
            out = linear(x, self.weight, bias)  # [.., o/w]
        if self.skip_bias_add:
            return out, self.bias
        if self.gather_output:
            out = gather_from_tensor_model_parallel_region(out, self.tp_group)  # [.., o] rank-major
            if self.stride > 1 and self.tp_world_size > 1:
                # Rank-major [r][chunk][piece] -> chunk-major [chunk][r][piece]: canonical order.
                lead = out.shape[:-1]
                piece = self.output_size // (self.stride * self.tp_world_size)
                out = out.reshape(*lead, self.tp_world_size, self.stride, piece)
                out = out.transpose(-3, -2).reshape(*lead, self.output_size)
        return out

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, "
            f"tp={self.tp_world_size}, stride={self.stride}, bias={self.bias is not None}, "
            f"gather_output={self.gather_output}, skip_bias_add={self.skip_bias_add}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A [o, i]`` split along i (dim 1); partial products are all-reduced.

    The bias is replicated and added *after* the all-reduce (added once, not w times).
    ``input_is_parallel=False`` scatters a replicated input first. ``skip_bias_add=True`` returns
    ``(x A^T, b)`` so the caller can fuse bias + dropout + residual add. ``sequence_parallel=True``
    reduce-scatters the partial products along the sequence (dim 1) instead: the output is this
    rank's ``[b, s/w, o]``, and the bias, applied to that slice, needs
    ``sum_sequence_parallel_gradients``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        tp_group: dist.ProcessGroup | None = None,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        sequence_parallel: bool = False,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError(
                "RowParallelLinear: sequence_parallel=True needs input_is_parallel=True (the "
                "input is the column-parallel output of a TP region, not a replicated tensor)"
            )
        self.input_size = input_size
        self.output_size = output_size
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.tp_rank, self.tp_world_size = get_tensor_model_parallel_rank_and_size(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_world_size > 1
        self.input_size_per_partition = _partition_size(
            input_size, self.tp_world_size, 1, "RowParallelLinear input_size"
        )
        self.weight = _new_parameter(
            (output_size, self.input_size_per_partition), params_dtype, device, 1
        )  # [o, i/w]
        if bias:
            self.bias = _new_parameter((output_size,), params_dtype, device, None)  # [o]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)
        partial = linear(x, self.weight)  # [.., o], this rank's share of the sum over i
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)  # [b,s/w,o]
        else:
            out = reduce_from_tensor_model_parallel_region(partial, self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, "
            f"tp={self.tp_world_size}, bias={self.bias is not None}, "
            f"input_is_parallel={self.input_is_parallel}, skip_bias_add={self.skip_bias_add}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocab (dim 0): rank r owns ids ``[r*v/w, (r+1)*v/w)``.

    Each rank looks up the ids it owns, writes zeros for the others, and the all-reduce assembles
    the rows. Ids outside ``[0, v)`` raise at TP=1 (like ``nn.Embedding``) but give zero rows under
    TP (no rank owns them): callers keep ids in range.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_group: dist.ProcessGroup | None = None,
        params_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_group = tp_group
        self.tp_rank, self.tp_world_size = get_tensor_model_parallel_rank_and_size(tp_group)
        self.num_embeddings_per_partition = _partition_size(
            num_embeddings, self.tp_world_size, 1, "VocabParallelEmbedding num_embeddings"
        )
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _new_parameter(
            (self.num_embeddings_per_partition, embedding_dim), params_dtype, device, 0
        )  # [v/w, h]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_world_size == 1:
            return F.embedding(input_ids, self.weight)  # [.., h]
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        rows = F.embedding(local_ids, self.weight)  # [.., h]
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(rows, self.tp_group)  # [.., h]

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"tp={self.tp_world_size}"
        )


def load_full_parameters(
    module: nn.Module,
    full_state: Mapping[str, torch.Tensor],
    tp_group: dist.ProcessGroup | None,
) -> None:
    """Copy full (unpartitioned) tensors into ``module``'s parameters, sharding TP ones.

    ``full_state`` maps every parameter name of ``module`` (``named_parameters``) to its full
    tensor; partitioned parameters receive ``shard_tensor(full, partition_dim, partition_stride,
    tp_rank, tp_size)``, replicated ones the full tensor. Missing or unexpected names and shape
    mismatches raise ``ValueError``.
    """
    rank, world_size = get_tensor_model_parallel_rank_and_size(tp_group)
    params = dict(module.named_parameters())
    missing = sorted(params.keys() - full_state.keys())
    unexpected = sorted(full_state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"load_full_parameters: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, param in params.items():
            full = full_state[name]
            if getattr(param, "tensor_model_parallel", False):
                value = shard_tensor(
                    full, param.partition_dim, param.partition_stride, rank, world_size
                )
            else:
                value = full
            if value.shape != param.shape:
                raise ValueError(
                    f"load_full_parameters: {name} has shape {tuple(param.shape)} on TP rank "
                    f"{rank} of {world_size}, the full tensor {tuple(full.shape)} gives "
                    f"{tuple(value.shape)}"
                )
            param.copy_(value)


def gather_full_parameters(
    module: nn.Module, tp_group: dist.ProcessGroup | None, grads: bool = False
) -> dict[str, torch.Tensor]:
    """Every parameter of ``module`` (or its ``.grad`` with ``grads=True``) as its full tensor.

    A collective over ``tp_group``: partitioned parameters are all-gathered and reassembled with
    ``gather_tensor_shards``; replicated ones are returned as detached clones. With ``grads=True``
    parameters without a gradient are left out.
    """
    _, world_size = get_tensor_model_parallel_rank_and_size(tp_group)
    full: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if grads and param.grad is None:
            continue
        value = param.grad.detach() if grads else param.detach()
        if getattr(param, "tensor_model_parallel", False) and world_size > 1:
            shards = [torch.empty_like(value) for _ in range(world_size)]
            dist.all_gather(shards, value.contiguous(), group=tp_group)
            full[name] = gather_tensor_shards(shards, param.partition_dim, param.partition_stride)
        else:
            full[name] = value.clone()
    return full


def sum_sequence_parallel_gradients(module: nn.Module, tp_group: dist.ProcessGroup | None) -> None:
    """Under sequence parallelism, sum the gradient of every replicated parameter of ``module`` over
    ``tp_group``; a no-op without TP.

    A replicated parameter applied to this rank's ``[b, s/w, h]`` slice (a LayerNorm's weight and
    bias, a row-parallel bias) gets from backward the gradient of those ``s/w`` positions only. A
    hook on the parameter adds the other ranks' shares before the gradient reaches ``.grad``, so
    every consumer (gradient clipping, the optimizer, DeepSpeed's data-parallel reduction and ZeRO
    partitioning) sees the whole sequence's gradient, identical on the TP ranks, with no step of
    its own. Such parameters are marked ``sequence_parallel = True`` (Megatron's attribute); a
    marked one is not hooked twice. Partitioned parameters are left alone.
    """
    _, world_size = get_tensor_model_parallel_rank_and_size(tp_group)
    if world_size == 1:
        return
    for param in module.parameters():
        if getattr(param, "tensor_model_parallel", False) or getattr(
            param, "sequence_parallel", False
        ):
            continue
        param.register_hook(functools.partial(all_reduce_sum, group=tp_group))
        param.sequence_parallel = True  # type: ignore[attr-defined]
