"""ParallelTopology arithmetic (no torch.distributed) and its equality with DeepSpeed's layout."""

from __future__ import annotations

import itertools

import pytest

from megatron_glm.parallel.topology import ParallelCoordinates, ParallelGroups, ParallelTopology

LAYOUTS = [(1, 1, 1), (2, 2, 1), (4, 1, 4), (8, 2, 2), (8, 1, 2), (8, 4, 1), (12, 2, 3), (16, 2, 2)]


def test_world8_tp2_pp2_groups() -> None:
    topo = ParallelTopology(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert topo.data_parallel_size == 2
    assert topo.tensor_model_parallel_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.data_parallel_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.pipeline_model_parallel_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.model_parallel_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert topo.coordinates(5) == ParallelCoordinates(tp_rank=1, dp_rank=0, pp_rank=1)
    assert topo.coordinates(6) == ParallelCoordinates(tp_rank=0, dp_rank=1, pp_rank=1)
    assert topo.rank_of(tp_rank=1, dp_rank=1, pp_rank=0) == 3
    assert topo.tensor_model_parallel_ranks(6) == [6, 7]
    assert topo.data_parallel_ranks(6) == [4, 6]
    assert topo.pipeline_model_parallel_ranks(6) == [2, 6]
    assert topo.model_parallel_ranks(6) == [2, 3, 6, 7]


@pytest.mark.parametrize(("world", "tp", "pp"), LAYOUTS)
def test_rank_formula_and_partitions(world: int, tp: int, pp: int) -> None:
    topo = ParallelTopology(world, tp, pp)
    dp = topo.data_parallel_size
    assert tp * dp * pp == world
    for rank in range(world):
        c = topo.coordinates(rank)
        assert rank == (c.pp_rank * dp + c.dp_rank) * tp + c.tp_rank
        assert topo.rank_of(c.tp_rank, c.dp_rank, c.pp_rank) == rank
    for groups, size in (
        (topo.tensor_model_parallel_groups(), tp),
        (topo.data_parallel_groups(), dp),
        (topo.pipeline_model_parallel_groups(), pp),
        (topo.model_parallel_groups(), tp * pp),
    ):
        assert all(len(g) == size for g in groups)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(world))


@pytest.mark.parametrize(("world", "tp", "pp"), LAYOUTS)
def test_same_layout_as_deepspeed(world: int, tp: int, pp: int) -> None:
    """DeepSpeed's PipeModelDataParallelTopology(num_pp, num_mp, num_dp) has axes
    [pipe, data, model] (model fastest): rank = (pp * dp + dp_rank) * tp + tp_rank, as ours."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = ParallelTopology(world, tp, pp)
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=topo.data_parallel_size)
    assert ds.get_axis_names() == ["pipe", "data", "model"]
    for rank in range(world):
        c = topo.coordinates(rank)
        ds_c = ds.get_coord(rank)
        assert (ds_c.pipe, ds_c.data, ds_c.model) == (c.pp_rank, c.dp_rank, c.tp_rank)
    assert sorted(ds.get_axis_comm_lists("model")) == sorted(topo.tensor_model_parallel_groups())
    assert sorted(ds.get_axis_comm_lists("data")) == sorted(topo.data_parallel_groups())
    assert sorted(ds.get_axis_comm_lists("pipe")) == sorted(topo.pipeline_model_parallel_groups())
    # DeepSpeed's grid "model parallel" group: all ranks with the same data index.
    ds_model = [sorted(ds.get_axis_list("data", d)) for d in range(topo.data_parallel_size)]
    assert ds_model == topo.model_parallel_groups()
    assert topo.to_deepspeed().get_coord(world - 1) == ds.get_coord(world - 1)


def test_invalid_degrees_name_every_value() -> None:
    with pytest.raises(
        ValueError,
        match=r"world_size 6 is not divisible by tensor_model_parallel_size 4 \* "
        r"pipeline_model_parallel_size 1 = 4",
    ):
        ParallelTopology(6, tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match="world_size 8 .*_size 2 .*_size 3 = 6"):
        ParallelTopology(8, 2, 3)
    with pytest.raises(ValueError, match="'tensor_model_parallel_size': 0"):
        ParallelTopology(8, 0, 1)
    topo = ParallelTopology(4, 2, 1)
    with pytest.raises(ValueError, match=r"rank 4 is outside \[0, 4\)"):
        topo.coordinates(4)
    with pytest.raises(ValueError, match="tp_rank=2, dp_rank=0, pp_rank=0 are outside tp=2"):
        topo.rank_of(2, 0, 0)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        topo.build_groups(0)


def test_deepspeed_reads_our_mpu_as_meant() -> None:
    """DeepSpeed's bwc helpers (how its engine queries an mpu) on a ParallelGroups.

    Group objects are stand-ins here (the helpers only hand them on); real groups are checked in
    tests/distributed/test_parallel_topology.py.
    """
    from deepspeed.utils import bwc

    topo = ParallelTopology(8, 2, 2)
    rank = 6  # tp 0, dp 1, pp 1
    kinds = {
        "tp": topo.tensor_model_parallel_ranks(rank),
        "dp": topo.data_parallel_ranks(rank),
        "pp": topo.pipeline_model_parallel_ranks(rank),
        "mp": topo.model_parallel_ranks(rank),
    }
    stand_ins = {kind: object() for kind in kinds}
    groups = ParallelGroups(topo, rank, {k: (m, stand_ins[k]) for k, m in kinds.items()})
    assert bwc.bwc_tensor_model_parallel_rank(groups) == 0
    assert bwc.bwc_tensor_model_parallel_world_size(groups) == 2
    assert bwc.bwc_tensor_model_parallel_group(groups) is stand_ins["tp"]
    assert bwc.bwc_pipeline_parallel_world_size(groups) == 2
    assert bwc.bwc_pipeline_parallel_group(groups) is stand_ins["pp"]
    assert groups.get_model_parallel_rank() == 2  # pp_rank * tp + tp_rank in [2, 3, 6, 7]
    assert groups.get_model_parallel_group() is stand_ins["mp"]
    assert groups.get_data_parallel_group_ranks() == [4, 6]
    assert groups.get_tensor_model_parallel_src_rank() == 6
    assert (groups.is_first_stage, groups.is_last_stage) == (False, True)
    assert (groups.prev_stage_rank, groups.next_stage_rank) == (2, None)
    # Deliberately absent: DeepSpeed switches to Ulysses sequence parallelism when it finds them.
    assert not hasattr(groups, "get_sequence_parallel_world_size")
    assert not hasattr(groups, "initialize_sequence_parallel")
