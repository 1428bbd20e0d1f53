"""RNG streams across TP ranks, and activation checkpointing of a TP block with dropout."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel import (
    ColumnParallelLinear,
    ParallelTopology,
    RNGStatesTracker,
    RowParallelLinear,
    checkpoint,
    model_parallel_seed,
)
from tests.distributed.harness import run_distributed

SEED = 1234


def _masks(tracker: RNGStatesTracker) -> tuple[torch.Tensor, torch.Tensor]:
    default = F.dropout(torch.ones(64), p=0.5, training=True)
    with tracker.fork():
        parallel = F.dropout(torch.ones(64), p=0.5, training=True)
    return default, parallel


class _TPBlock(nn.Module):
    """Column -> GeLU -> dropout on the TP stream -> row -> dropout on the default stream."""

    def __init__(self, group: dist.ProcessGroup, tracker: RNGStatesTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.up = ColumnParallelLinear(8, 16, group)
        self.down = RowParallelLinear(16, 8, group)
        gen = torch.Generator().manual_seed(0)
        for param in self.parameters():
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        with self.tracker.fork():
            h = F.dropout(h, p=0.3, training=True)  # partitioned: per-TP-rank mask
        return F.dropout(self.down(h), p=0.3, training=True)  # replicated: same mask


def _block_grads(block: _TPBlock, use_checkpoint: bool, tp_rank: int) -> list[torch.Tensor]:
    block.zero_grad()
    model_parallel_seed(SEED, tp_rank, block.tracker)
    x = torch.randn(3, 8, requires_grad=True)  # same on every rank (default stream)
    out = checkpoint(block, x, tracker=block.tracker) if use_checkpoint else block(x)
    out = checkpoint(block, out, tracker=block.tracker) if use_checkpoint else block(out)
    out.square().sum().backward()
    return [x.grad.clone(), *(p.grad.clone() for p in block.parameters())]


def _rng_checks(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    groups = ParallelTopology(world_size, tensor_model_parallel_size=2).build_groups(rank)
    tracker = model_parallel_seed(SEED, groups.tp_rank, RNGStatesTracker(cuda=False))
    default, parallel = _masks(tracker)

    everyone = [torch.empty_like(default) for _ in range(world_size)]
    dist.all_gather(everyone, default)
    assert all(torch.equal(m, default) for m in everyone), "default stream differs across ranks"
    tp_peers = [torch.empty_like(parallel) for _ in range(groups.tp_size)]
    dist.all_gather(tp_peers, parallel, group=groups.tp_group)
    assert not torch.equal(tp_peers[0], tp_peers[1]), "TP ranks drew the same forked mask"

    block = _TPBlock(groups.tp_group, tracker)
    plain = _block_grads(block, False, groups.tp_rank)
    checkpointed = _block_grads(block, True, groups.tp_rank)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The replicated output dropout kept the TP ranks replicas: equal input gradients.
    x_grads = [torch.empty_like(plain[0]) for _ in range(groups.tp_size)]
    dist.all_gather(x_grads, plain[0], group=groups.tp_group)
    torch.testing.assert_close(x_grads[0], x_grads[1], rtol=0, atol=0)
    return {"tp_rank": torch.tensor(groups.tp_rank), "default": default, "parallel": parallel}


def test_rng_streams_and_checkpoint_across_tp_ranks() -> None:
    results = run_distributed(_rng_checks, 4, timeout=120)
    # tp 2 x dp 2: ranks with the same TP rank draw the same forked mask ...
    assert torch.equal(results[0]["parallel"], results[2]["parallel"])
    assert torch.equal(results[1]["parallel"], results[3]["parallel"])
    # ... and the masks are a pure function of (seed, tp_rank): this process reproduces them.
    for result in results:
        tracker = model_parallel_seed(SEED, int(result["tp_rank"]), RNGStatesTracker(cuda=False))
        default, parallel = _masks(tracker)
        assert torch.equal(result["default"], default)
        assert torch.equal(result["parallel"], parallel)
