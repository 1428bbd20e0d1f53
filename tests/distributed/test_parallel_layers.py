"""TP layers, mappings and vocab-parallel cross entropy against their single-process twins.

Every rank builds the full weights and inputs from the same seed, runs the unpartitioned
computation itself (the twin) and the TP layer on its shard, and compares outputs and gradients
(gathered) at fp32 tolerance. All checks for one world size share one spawned run (spawn is the
cost).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    gather_full_parameters,
    load_full_parameters,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
    shard_tensor,
)
from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from tests.distributed.harness import run_distributed

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def _check_column(group: dist.ProcessGroup, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(1)
    in_size, out_size = 8, 12  # 12 divides by stride 3 * world for world 2 and 4
    weight = torch.randn(out_size, in_size, generator=gen)
    bias = torch.randn(out_size, generator=gen)
    x_full = torch.randn(2, 3, in_size, generator=gen)
    upstream = torch.randn(2, 3, out_size, generator=gen)  # d loss / d output

    x_ref = x_full.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    b_ref = bias.clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    (y_ref * upstream).sum().backward()

    for stride in (1, 3):
        for gather_output in (False, True):
            what = f"column stride={stride} gather_output={gather_output}"
            layer = ColumnParallelLinear(
                in_size, out_size, group, gather_output=gather_output, stride=stride
            )
            assert layer.weight.shape == (out_size // world, in_size)
            assert layer.weight.partition_stride == stride and layer.weight.partition_dim == 0
            load_full_parameters(layer, {"weight": weight, "bias": bias}, group)
            x = x_full.clone().requires_grad_()
            y = layer(x)
            if gather_output:
                _close(y, y_ref.detach(), f"{what} output")
                (y * upstream).sum().backward()
            else:
                y_expected = shard_tensor(y_ref.detach(), -1, stride, rank, world)
                _close(y, y_expected, f"{what} output")
                (y * shard_tensor(upstream, -1, stride, rank, world)).sum().backward()
            _close(x.grad, x_ref.grad, f"{what} input grad")
            grads = gather_full_parameters(layer, group, grads=True)
            _close(grads["weight"], w_ref.grad, f"{what} weight grad")
            _close(grads["bias"], b_ref.grad, f"{what} bias grad")

    # skip_bias_add hands back the bias shard un-added.
    layer = ColumnParallelLinear(in_size, out_size, group, skip_bias_add=True, stride=3)
    load_full_parameters(layer, {"weight": weight, "bias": bias}, group)
    out, out_bias = layer(x_full)
    _close(out + out_bias, shard_tensor(y_ref.detach(), -1, 3, rank, world), "column skip_bias_add")


def _check_row(group: dist.ProcessGroup, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(2)
    in_size, out_size = 8, 6
    weight = torch.randn(out_size, in_size, generator=gen)
    bias = torch.randn(out_size, generator=gen)
    x_full = torch.randn(2, 3, in_size, generator=gen)
    upstream = torch.randn(2, 3, out_size, generator=gen)

    x_ref = x_full.clone().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    b_ref = bias.clone().requires_grad_()
    y_ref = F.linear(x_ref, w_ref, b_ref)
    (y_ref * upstream).sum().backward()

    for input_is_parallel in (True, False):
        what = f"row input_is_parallel={input_is_parallel}"
        layer = RowParallelLinear(in_size, out_size, group, input_is_parallel=input_is_parallel)
        assert layer.weight.shape == (out_size, in_size // world)
        assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 1
        assert layer.bias.tensor_model_parallel is False
        load_full_parameters(layer, {"weight": weight, "bias": bias}, group)
        source = shard_tensor(x_full, -1, 1, rank, world) if input_is_parallel else x_full
        x = source.clone().requires_grad_()
        y = layer(x)
        _close(y, y_ref.detach(), f"{what} output")
        (y * upstream).sum().backward()
        expected_x_grad = (
            shard_tensor(x_ref.grad, -1, 1, rank, world) if input_is_parallel else x_ref.grad
        )
        _close(x.grad, expected_x_grad, f"{what} input grad")
        grads = gather_full_parameters(layer, group, grads=True)
        _close(grads["weight"], w_ref.grad, f"{what} weight grad")
        # Replicated bias: the full gradient on every rank, added once (not world times).
        _close(grads["bias"], b_ref.grad, f"{what} bias grad")

    layer = RowParallelLinear(in_size, out_size, group, skip_bias_add=True)
    load_full_parameters(layer, {"weight": weight, "bias": bias}, group)
    out, out_bias = layer(shard_tensor(x_full, -1, 1, rank, world))
    _close(out + out_bias, y_ref.detach(), "row skip_bias_add")


def _check_embedding(group: dist.ProcessGroup, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(3)
    vocab, dim = 16, 5
    weight = torch.randn(vocab, dim, generator=gen)
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    ids[0, :2] = torch.tensor([0, vocab - 1])  # both ends of the vocab
    upstream = torch.randn(3, 7, dim, generator=gen)

    w_ref = weight.clone().requires_grad_()
    y_ref = F.embedding(ids, w_ref)
    (y_ref * upstream).sum().backward()

    layer = VocabParallelEmbedding(vocab, dim, group)
    assert layer.weight.shape == (vocab // world, dim)
    assert (layer.vocab_start_index, layer.vocab_end_index) == (
        rank * vocab // world,
        (rank + 1) * vocab // world,
    )
    load_full_parameters(layer, {"weight": weight}, group)
    y = layer(ids)
    _close(y, y_ref.detach(), "embedding output")
    (y * upstream).sum().backward()
    _close(gather_full_parameters(layer, group, grads=True)["weight"], w_ref.grad, "embedding grad")


def _check_cross_entropy(group: dist.ProcessGroup, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(4)
    vocab = 16
    # Large logits: without the all-reduced max, exp() overflows in fp32.
    logits_full = torch.randn(2, 5, vocab, generator=gen) * 30.0 + 100.0
    labels = torch.randint(0, vocab, (2, 5), generator=gen)
    labels[0, 0], labels[0, 1] = 0, vocab - 1
    weights = torch.rand(2, 5, generator=gen)

    ref_in = logits_full.clone().requires_grad_()
    loss_ref = F.cross_entropy(ref_in.view(-1, vocab), labels.view(-1), reduction="none").view(2, 5)
    (loss_ref * weights).sum().backward()

    shard = shard_tensor(logits_full, -1, 1, rank, world).requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, labels, group)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    _close(loss, loss_ref.detach(), "cross entropy loss")
    (loss * weights).sum().backward()
    _close(shard.grad, shard_tensor(ref_in.grad, -1, 1, rank, world), "cross entropy grad")

    # Low-precision logits are computed in fp32 inside; the gradient keeps the input dtype.
    half = shard_tensor(logits_full, -1, 1, rank, world).bfloat16().requires_grad_()
    loss_half = vocab_parallel_cross_entropy(half, labels, group)
    assert loss_half.dtype == torch.float32
    ref_half = F.cross_entropy(
        logits_full.bfloat16().float().view(-1, vocab), labels.view(-1), reduction="none"
    ).view(2, 5)
    _close(loss_half, ref_half, "cross entropy bf16 loss")
    loss_half.sum().backward()
    assert half.grad.dtype == torch.bfloat16


def _check_mappings(group: dist.ProcessGroup, rank: int, world: int) -> None:
    width = 2 * world
    # Rank-dependent upstream gradients make a missing or doubled reduction visible.
    grads = [torch.arange(width, dtype=torch.float32) + 10.0 * r for r in range(world)]
    grad_sum = sum(grads)
    full = torch.arange(width, dtype=torch.float32) * (rank + 1)
    values = [torch.arange(width, dtype=torch.float32) * (r + 1) for r in range(world)]

    x = full.clone().requires_grad_()
    y = copy_to_tensor_model_parallel_region(x, group)
    _close(y, full, "copy forward")
    y.backward(grads[rank])
    _close(x.grad, grad_sum, "copy backward (all-reduce)")

    x = full.clone().requires_grad_()
    y = reduce_from_tensor_model_parallel_region(x, group)
    _close(y, sum(values), "reduce forward (all-reduce)")
    _close(x.detach(), full, "reduce leaves its input unchanged")
    y.backward(grads[rank])
    _close(x.grad, grads[rank], "reduce backward (identity)")

    x = full.clone().requires_grad_()
    y = scatter_to_tensor_model_parallel_region(x, group)
    _close(y, full[rank * 2 : rank * 2 + 2], "scatter forward")
    y.backward(grads[rank][:2])
    expected = torch.cat([grads[r][:2] for r in range(world)])
    _close(x.grad, expected, "scatter backward (all-gather)")

    x = full[:2].clone().requires_grad_()
    y = gather_from_tensor_model_parallel_region(x, group)
    _close(y, torch.cat([v[:2] for v in values]), "gather forward")
    y.backward(grads[rank])
    _close(x.grad, grads[rank][rank * 2 : rank * 2 + 2], "gather backward (split)")


def _check_size_errors(group: dist.ProcessGroup, rank: int, world: int) -> None:
    with pytest.raises(ValueError, match=rf"output_size 9 is not divisible .* size {world}"):
        ColumnParallelLinear(8, 9, group)
    with pytest.raises(ValueError, match=rf"output_size {4 * world} .* stride 3"):
        ColumnParallelLinear(8, 4 * world, group, stride=3)
    with pytest.raises(ValueError, match=rf"input_size 7 is not divisible .* size {world}"):
        RowParallelLinear(7, 8, group)
    with pytest.raises(ValueError, match=rf"num_embeddings 15 is not divisible .* size {world}"):
        VocabParallelEmbedding(15, 4, group)


def _all_layer_checks(rank: int, world_size: int) -> str:
    group = dist.new_group(list(range(world_size)))
    _check_mappings(group, rank, world_size)
    _check_column(group, rank, world_size)
    _check_row(group, rank, world_size)
    _check_embedding(group, rank, world_size)
    _check_cross_entropy(group, rank, world_size)
    _check_size_errors(group, rank, world_size)
    if world_size == 4:
        # TP groups {0,1} and {2,3} inside a world of 4: layers must use their group's ranks,
        # not global ones. Every rank creates both groups, in the same order.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        _check_mappings(pair, rank % 2, 2)
        _check_column(pair, rank % 2, 2)
        _check_row(pair, rank % 2, 2)
        _check_embedding(pair, rank % 2, 2)
        _check_cross_entropy(pair, rank % 2, 2)
    return "ok"


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_layers_match_single_process_twins(world_size: int) -> None:
    """At 4 ranks also inside two TP pairs of the world (group-local ranks)."""
    assert run_distributed(_all_layer_checks, world_size, timeout=120) == ["ok"] * world_size
