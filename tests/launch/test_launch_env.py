"""Rank/world discovery from each launcher's environment variables (megatron_glm.training.launch)."""

from __future__ import annotations

import pytest

from megatron_glm.training.launch import (
    DEFAULT_MASTER_PORT,
    LaunchEnv,
    discover_launch_env,
    export_launch_env,
)


class _FakeComm:
    """The two mpi4py calls discovery makes; bcast returns what rank 0 would send."""

    def __init__(self, rank: int, root_value: str) -> None:
        self.rank, self.root_value, self.calls = rank, root_value, 0

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's name)
        return self.rank

    def bcast(self, value: object, root: int = 0) -> str:
        assert root == 0
        self.calls += 1
        return self.root_value


def test_torchrun_and_deepspeed_variables() -> None:
    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29555",
    }
    assert discover_launch_env(torchrun) == LaunchEnv(3, 4, 1, 2, "10.0.0.1", 29555, "env")
    # The deepspeed launcher says LOCAL_SIZE instead of LOCAL_WORLD_SIZE.
    deepspeed = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29600",
        "CROSS_RANK": "1",
    }
    launch = discover_launch_env(deepspeed)
    assert launch == LaunchEnv(1, 2, 0, 1, "127.0.0.1", 29600, "env")
    assert launch.num_nodes == 2


def test_env_variables_win_over_mpi() -> None:
    # DeepSpeed's --launcher openmpi runs under mpirun but also exports RANK & co.
    environ = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "h0",
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
    }
    assert discover_launch_env(environ).launcher == "env"


def test_open_mpi_single_node_uses_loopback() -> None:
    environ = {
        "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_SIZE": "2",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    comm = _FakeComm(1, "never used")
    launch = discover_launch_env(environ, mpi_comm=comm)
    assert launch == LaunchEnv(1, 2, 1, 2, "127.0.0.1", DEFAULT_MASTER_PORT, "openmpi")
    assert comm.calls == 0


def test_mpi_multi_node_broadcasts_rank0_address_unless_given() -> None:
    environ = {
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        "MASTER_PORT": "1234",
    }
    comm = _FakeComm(2, "192.168.7.1")
    assert discover_launch_env(environ, mpi_comm=comm) == LaunchEnv(
        2, 4, 0, 2, "192.168.7.1", 1234, "mpich"
    )
    assert comm.calls == 1
    given = discover_launch_env({**environ, "MASTER_ADDR": "node0"}, mpi_comm=comm)
    assert given.master_addr == "node0" and comm.calls == 1


def test_no_launcher_is_a_single_process() -> None:
    assert discover_launch_env({}) == LaunchEnv(
        0, 1, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single"
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "RANK='x'"),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "RANK is not set"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, "rank 2 is not in"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "master port"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not set"),
    ],
)
def test_bad_environments_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        discover_launch_env(environ)


def test_export_round_trips() -> None:
    launch = LaunchEnv(1, 4, 1, 2, "10.1.2.3", 29501, "openmpi")
    environ: dict[str, str] = {}
    export_launch_env(launch, environ)
    assert environ["RANK"] == "1" and environ["LOCAL_WORLD_SIZE"] == "2"
    assert discover_launch_env(environ) == LaunchEnv(1, 4, 1, 2, "10.1.2.3", 29501, "env")


def _init_then_shutdown(rank: int, world_size: int) -> tuple[int, int, str, bool]:
    import torch.distributed as dist

    from megatron_glm.training.launch import init_distributed, shutdown_distributed

    # The harness already made the default group from the same variables: kept, checked.
    launch = init_distributed()
    shutdown_distributed()
    return launch.rank, launch.world_size, launch.launcher, dist.is_initialized()


def test_init_keeps_an_existing_group_and_shutdown_destroys_it() -> None:
    from tests.distributed.harness import run_distributed

    assert run_distributed(_init_then_shutdown, 2, timeout=60) == [
        (0, 2, "env", False),
        (1, 2, "env", False),
    ]
