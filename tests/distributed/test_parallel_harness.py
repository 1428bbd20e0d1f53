"""The multi-process harness itself: results come back, failures and hangs fail the test."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import DistributedRunError, DistributedTimeoutError, run_distributed


def _report(rank: int, world_size: int, scale: float, *, offset: int) -> dict[str, object]:
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["OMP_NUM_THREADS"]),
        "threads": torch.get_num_threads(),
        "sum": value * scale + offset,
    }


def test_results_in_rank_order_with_args_and_env() -> None:
    results = run_distributed(_report, 2, 10.0, offset=1, timeout=60)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    assert [r["env"] for r in results] == [("0", "2", "1"), ("1", "2", "1")]
    assert all(r["threads"] == 1 for r in results)
    # 1 + 2 summed over ranks, scaled, offset: the tensor made it back by value.
    for r in results:
        torch.testing.assert_close(r["sum"], torch.tensor([31.0]))


def _fail_or_die(rank: int, world_size: int) -> None:
    if rank == 0:
        raise ValueError("boom from rank 0")
    os._exit(3)  # dies without a Python exception


def test_failing_and_dying_ranks_fail_the_run() -> None:
    with pytest.raises(DistributedRunError) as info:
        run_distributed(_fail_or_die, 2, timeout=60)
    message = str(info.value)
    assert "ValueError: boom from rank 0" in message
    assert "Traceback" in message  # the child's traceback, not just the message
    assert "rank 1 exited with code 3" in message


def _hang_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)
    return rank


def test_hanging_rank_times_out_and_is_killed() -> None:
    start = time.monotonic()
    with pytest.raises(
        DistributedTimeoutError, match=r"ranks \[(0, )?1\] did not finish within timeout=5"
    ):
        run_distributed(_hang_on_rank_1, 2, timeout=5)
    assert time.monotonic() - start < 20
    assert multiprocessing.active_children() == []  # the hanging rank was killed and reaped


def test_unpicklable_function_is_reported_in_the_parent() -> None:
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        run_distributed(lambda rank, world_size: rank, 2, timeout=30)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_distributed(_report, 0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        run_distributed(_report, 1, timeout=0)
