"""Partition arithmetic: shard_tensor / gather_tensor_shards and divide."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.parallel.utils import divide, gather_tensor_shards, shard_tensor


def test_divide() -> None:
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="10 is not divisible by 4"):
        divide(10, 4)
    with pytest.raises(ValueError, match="10 is not divisible by 0"):
        divide(10, 0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_gather_round_trip(world_size: int, stride: int, dim: int) -> None:
    shape = [5, 7, 3]
    shape[dim] = 2 * stride * world_size
    full = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    shards = [shard_tensor(full, dim, stride, rank, world_size) for rank in range(world_size)]
    for shard in shards:
        assert shard.size(dim) == full.size(dim) // world_size
        assert shard.is_contiguous()
    assert torch.equal(gather_tensor_shards(shards, dim, stride), full)
    # The shards partition the elements: each appears exactly once.
    together = torch.cat([s.flatten() for s in shards]).sort().values
    assert torch.equal(together, full.flatten().sort().values)


def test_stride_3_is_the_qkv_layout() -> None:
    # 2 heads of head dim 2, h = 4: query_key_value rows are [Q (4 rows); K (4); V (4)].
    full = torch.arange(12).unsqueeze(1).expand(12, 3)  # row index in every column
    rank0 = shard_tensor(full, 0, 3, 0, 2)[:, 0].tolist()
    rank1 = shard_tensor(full, 0, 3, 1, 2)[:, 0].tolist()
    assert rank0 == [0, 1, 4, 5, 8, 9]  # [Q_0; K_0; V_0]: head 0's rows of each third
    assert rank1 == [2, 3, 6, 7, 10, 11]  # [Q_1; K_1; V_1]
    # Without stride, rank 0 would own all of Q: a different (wrong) layout.
    assert shard_tensor(full, 0, 1, 0, 2)[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_shard_is_a_copy() -> None:
    full = torch.zeros(4, 2)
    shard = shard_tensor(full, 0, 1, 0, 2)
    shard.fill_(1.0)
    assert full.sum() == 0


def test_errors_name_the_values() -> None:
    full = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="size 10 of dim 0 is not divisible by stride 3 \\* "):
        shard_tensor(full, 0, 3, 0, 1)
    with pytest.raises(ValueError, match="size 10 of dim 0 .* tensor-parallel size 4"):
        shard_tensor(full, 0, 1, 0, 4)
    with pytest.raises(ValueError, match="rank 2 is outside \\[0, 2\\)"):
        shard_tensor(full, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        gather_tensor_shards([torch.zeros(2, 4), torch.zeros(3, 4)], 0, 1)
    with pytest.raises(ValueError, match="shard size 5 of dim 0 is not divisible by stride 2"):
        gather_tensor_shards([torch.zeros(5, 4)], 0, 2)
    with pytest.raises(ValueError, match="at least one shard"):
        gather_tensor_shards([], 0, 1)
