"""build_groups on real gloo ranks: every group has the members the arithmetic says, and the mpu
methods DeepSpeed calls agree with them."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.parallel.topology import ParallelTopology
from tests.distributed.harness import run_distributed

LAYOUTS = [(1, 1), (2, 1), (2, 2), (1, 4), (4, 1), (1, 2)]  # (tp, pp) in a world of 4


def _members(group: dist.ProcessGroup, world_size: int) -> list[int]:
    """Who is in `group`, found by communicating over it (not by asking the topology)."""
    flags = torch.zeros(world_size)
    flags[dist.get_rank()] = 1.0
    dist.all_reduce(flags, group=group)
    return [r for r in range(world_size) if flags[r] > 0]


def _check_layouts(rank: int, world_size: int) -> list[dict[str, object]]:
    seen = []
    for tp, pp in LAYOUTS:
        topo = ParallelTopology(world_size, tp, pp)
        groups = topo.build_groups(rank)
        c = topo.coordinates(rank)
        assert _members(groups.tp_group, world_size) == groups.tp_ranks
        assert _members(groups.dp_group, world_size) == groups.dp_ranks
        assert _members(groups.pp_group, world_size) == groups.pp_ranks
        assert _members(groups.mp_group, world_size) == groups.mp_ranks
        assert groups.tp_ranks == topo.tensor_model_parallel_ranks(rank)
        assert (
            dist.get_rank(groups.tp_group) == c.tp_rank == groups.get_tensor_model_parallel_rank()
        )
        assert dist.get_rank(groups.dp_group) == c.dp_rank == groups.get_data_parallel_rank()
        assert dist.get_rank(groups.pp_group) == c.pp_rank == groups.get_pipe_parallel_rank()
        assert dist.get_rank(groups.mp_group) == groups.get_model_parallel_rank()
        assert groups.get_model_parallel_rank() == c.pp_rank * tp + c.tp_rank
        assert groups.get_model_parallel_world_size() == tp * pp
        assert groups.get_tensor_model_parallel_world_size() == tp
        assert groups.get_data_parallel_world_size() == world_size // (tp * pp)
        assert groups.get_pipeline_model_parallel_world_size() == pp
        assert groups.get_tensor_model_parallel_src_rank() == rank - c.tp_rank
        assert groups.get_data_parallel_group_ranks() == groups.dp_ranks
        assert groups.is_first_stage == (c.pp_rank == 0)
        assert groups.is_last_stage == (c.pp_rank == pp - 1)
        seen.append(
            {"tp": tp, "pp": pp, "prev": groups.prev_stage_rank, "next": groups.next_stage_rank}
        )
    return seen


def test_build_groups_on_four_ranks() -> None:
    results = run_distributed(_check_layouts, 4, timeout=120)
    # Pipeline neighbours for tp 1, pp 4: a chain 0 -> 1 -> 2 -> 3.
    chain = [r[LAYOUTS.index((1, 4))] for r in results]
    assert [(c["prev"], c["next"]) for c in chain] == [(None, 1), (0, 2), (1, 3), (2, None)]
    # tp 2, pp 2 (dp 1): stage 0 is ranks 0,1; rank 1's next stage is rank 3.
    assert results[1][LAYOUTS.index((2, 2))]["next"] == 3
