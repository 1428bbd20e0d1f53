"""Process-group start-up: find this process's rank and world from whichever launcher started it.

Supported launchers (docs/launching.md has the command lines):

- ``torchrun`` and the ``deepspeed`` launcher, single or multi node: both export ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun also
  ``LOCAL_WORLD_SIZE``, DeepSpeed ``LOCAL_SIZE``).
- ``mpirun``/``mpiexec``: Open MPI exports ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``,
  MPICH and Intel MPI ``PMI_RANK``/``PMI_SIZE`` (+ ``MPI_LOCALRANKID``/``MPI_LOCALNRANKS``). MPI does
  not say where rank 0 lives, so ``MASTER_ADDR`` comes from the environment (``mpirun -x
  MASTER_ADDR=...``), else 127.0.0.1 when every rank is on one node, else rank 0's address broadcast
  with mpi4py.
- nothing: a single process (world size 1).

The discovered values are written back as ``RANK``/``WORLD_SIZE``/... so DeepSpeed, which reads the
same variables, agrees with us and does not run its own MPI discovery.

Every collective gives up after the process group's timeout (``--distributed-timeout-minutes``);
``ProgressBoard`` notes in the group's store the iteration each rank started, so a rank whose
collective timed out can name the ranks that were behind.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_MASTER_PORT",
    "LaunchEnv",
    "ProgressBoard",
    "default_backend",
    "discover_launch_env",
    "export_launch_env",
    "init_distributed",
    "is_collective_timeout",
    "shutdown_distributed",
]

logger = logging.getLogger(__name__)

# torch.distributed's and DeepSpeed's default rendezvous port.
DEFAULT_MASTER_PORT = 29500

# (rank, size, local rank, local size) variable names of each MPI flavour, in lookup order.
_MPI_VARIABLES: tuple[tuple[str, tuple[str, str, str, str]], ...] = (
    (
        "openmpi",
        (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
    ),
    ("mpich", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")),
)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job. ``launcher`` is ``"env"`` (torchrun / deepspeed),
    ``"openmpi"``, ``"mpich"`` or ``"single"``."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is not in [0, local_world_size={self.local_world_size})"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port must be in 1..65535, got {self.master_port}")

    @property
    def num_nodes(self) -> int:
        """Node count, assuming every node runs ``local_world_size`` processes (what all the
        supported launchers do)."""
        return max(1, self.world_size // self.local_world_size)


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _routable_address() -> str:
    """This host's outward-facing IPv4 address (what other nodes can reach).

    Connecting a UDP socket sends nothing; it only asks the kernel which interface it would use.
    """
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))
            return str(sock.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _mpi_master_addr(mpi_comm: Any | None) -> str:
    if mpi_comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise ValueError(
                "launched by mpirun across several nodes without MASTER_ADDR: pass "
                "`-x MASTER_ADDR=<node 0 address>` to mpirun or install mpi4py "
                "(pip install 'megatron_glm[mpi]') so rank 0's address can be broadcast"
            ) from None
        mpi_comm = MPI.COMM_WORLD
    address = _routable_address() if mpi_comm.Get_rank() == 0 else None
    return str(mpi_comm.bcast(address, root=0))


def discover_launch_env(
    environ: Mapping[str, str] | None = None, *, mpi_comm: Any | None = None
) -> LaunchEnv:
    """Read rank/world/master from the launcher's environment variables (see the module doc).

    ``mpi_comm`` (an mpi4py communicator) is used only to broadcast rank 0's address for a
    multi-node MPI launch without ``MASTER_ADDR``; by default ``MPI.COMM_WORLD``.
    """
    environ = os.environ if environ is None else environ
    master_port = _int_var(environ, "MASTER_PORT", DEFAULT_MASTER_PORT)

    if "RANK" in environ or "WORLD_SIZE" in environ:
        rank = _int_var(environ, "RANK")
        world_size = _int_var(environ, "WORLD_SIZE")
        local_rank = _int_var(environ, "LOCAL_RANK", rank)
        local_size_name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in environ else "LOCAL_SIZE"
        local_world_size = _int_var(environ, local_size_name, world_size)
        master_addr = environ.get("MASTER_ADDR", "")
        if not master_addr:
            if world_size > 1:
                raise ValueError(
                    f"RANK={rank} and WORLD_SIZE={world_size} are set but MASTER_ADDR is not: "
                    "start the job with torchrun or the deepspeed launcher, or export MASTER_ADDR"
                )
            master_addr = "127.0.0.1"
        return LaunchEnv(
            rank, world_size, local_rank, local_world_size, master_addr, master_port, "env"
        )

    for flavour, (rank_var, size_var, local_rank_var, local_size_var) in _MPI_VARIABLES:
        if rank_var not in environ:
            continue
        rank = _int_var(environ, rank_var)
        world_size = _int_var(environ, size_var)
        # Without local information assume one node: right for `mpirun -np N` on one host.
        local_rank = _int_var(environ, local_rank_var, rank)
        local_world_size = _int_var(environ, local_size_var, world_size)
        master_addr = environ.get("MASTER_ADDR", "")
        if not master_addr:
            if local_world_size == world_size:
                master_addr = "127.0.0.1"
            else:
                master_addr = _mpi_master_addr(mpi_comm)
        return LaunchEnv(
            rank, world_size, local_rank, local_world_size, master_addr, master_port, flavour
        )

    return LaunchEnv(0, 1, 0, 1, environ.get("MASTER_ADDR") or "127.0.0.1", master_port, "single")


def export_launch_env(launch: LaunchEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write ``launch`` as the torchrun-style variables (what DeepSpeed and torch read)."""
    environ = os.environ if environ is None else environ
    environ.update(
        {
            "RANK": str(launch.rank),
            "WORLD_SIZE": str(launch.world_size),
            "LOCAL_RANK": str(launch.local_rank),
            "LOCAL_WORLD_SIZE": str(launch.local_world_size),
            "MASTER_ADDR": launch.master_addr,
            "MASTER_PORT": str(launch.master_port),
        }
    )


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo`` (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _torchrun_attempt_store(
    launch: LaunchEnv, timeout: timedelta, environ: Mapping[str, str]
) -> dist.Store | None:
    """Under torchrun, its agent's store with one key space per restart of the job; None
    elsewhere. The agent keeps its store across ``--max-restarts`` restarts, with the keys of the
    attempt that died, and gloo read a dead rank's address from them: a restarted job failed with
    "Gloo connectFullMesh failed ... Connection refused"."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        launch.master_addr, launch.master_port, launch.world_size, False, timeout=timeout
    )
    return dist.PrefixStore(f"megatron_glm/attempt_{attempt}", store)


def init_distributed(
    backend: str | None = None,
    timeout_s: float = 1800.0,
    environ: MutableMapping[str, str] | None = None,
) -> LaunchEnv:
    """Discover the launch, export it, and initialise the default ``torch.distributed`` group.

    Idempotent: if the default group already exists (a test harness made it), its rank and size
    must match the environment, and it is kept. On CUDA each process takes device ``local_rank``.
    """
    environ = os.environ if environ is None else environ
    launch = discover_launch_env(environ)
    export_launch_env(launch, environ)
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())

    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (launch.rank, launch.world_size):
            raise ValueError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {launch.rank} of "
                f"{launch.world_size}"
            )
        return launch

    timeout = timedelta(seconds=timeout_s)
    # Groups made later with new_group (ours in parallel/topology.py, DeepSpeed's pipeline groups)
    # get torch's 30-minute default, not this group's timeout: measured, a DP all-reduce waited
    # 25 s past a 15 s timeout. torch reads these module defaults whenever it makes a group.
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    restart_store = _torchrun_attempt_store(launch, timeout, environ)
    if launch.world_size == 1 and launch.launcher == "single":
        # No launcher: an in-memory store, so a plain `python pretrain_glm.py` needs no free port.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    elif restart_store is not None:
        dist.init_process_group(
            backend,
            store=restart_store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    else:
        host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    if launch.rank == 0:
        logger.info(
            "torch.distributed (%s) up: world %d on %d node(s), master %s:%d, launcher %s",
            backend,
            launch.world_size,
            launch.num_nodes,
            launch.master_addr,
            launch.master_port,
            launch.launcher,
        )
    return launch


def shutdown_distributed(*, synchronize: bool = True, timeout_s: float = 300.0) -> None:
    """Destroy every process group; with ``synchronize`` (a clean finish), after a barrier.

    Why the barrier: a rank that destroys its groups and exits while a peer may still be sending
    to it can leave a gloo transport thread behind, and the process then dies at interpreter exit
    with "terminate called without an active exception" (SIGABRT, exit code -6) although training
    finished (seen in about 1 of 4 two-node CPU runs; none in 16 with the barrier). After an error,
    skip it (``synchronize=False``): the other ranks may never arrive.
    """
    if not dist.is_initialized():
        return
    if synchronize and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                # Names the ranks that did not arrive instead of hanging forever.
                dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except RuntimeError as err:
            logger.warning("ranks did not all reach the final barrier: %s", err)
    dist.destroy_process_group()


def is_collective_timeout(err: BaseException) -> bool:
    """A collective gave up waiting for a peer: gloo raises ``RuntimeError("... Timed out waiting
    Nms for recv operation to complete")`` once the process-group timeout has passed."""
    return isinstance(err, RuntimeError) and "timed out" in str(err).lower()


class ProgressBoard:
    """The last iteration each rank reached, kept in the store the default process group was
    made with, so that after a collective timeout the waiting ranks can name the one behind."""

    _PREFIX = "megatron_glm/progress/"

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size

    @classmethod
    def of_default_group(cls) -> ProgressBoard:
        # torch has no public accessor for the default group's store
        store = dist.distributed_c10d._get_default_store()  # noqa: SLF001
        return cls(store, dist.get_rank(), dist.get_world_size())

    def record(self, iteration: int) -> None:
        self.store.set(f"{self._PREFIX}{self.rank}", str(iteration))

    def describe(self) -> str:
        """Which ranks are behind the others (read without waiting for a rank that never wrote)."""
        reached: dict[int, int | None] = {}
        for rank in range(self.world_size):
            key = f"{self._PREFIX}{rank}"
            try:
                reached[rank] = int(self.store.get(key)) if self.store.check([key]) else None
            except RuntimeError:  # the store's host (rank 0 or the launcher) is gone too
                return "the job's store is unreachable, so the ranks' progress is unknown"
        known = [it for it in reached.values() if it is not None]
        if not known:
            return "no rank has started an iteration"
        front = max(known)
        behind = {r: it for r, it in reached.items() if it is None or it < front}
        if not behind:
            return (
                f"every rank started iteration {front}: the rank that did not answer is stuck "
                "inside it (a kernel, the data loader, or a collective the others never joined)"
            )
        return f"rank(s) behind iteration {front}: " + ", ".join(
            f"rank {r} (last started {'none' if it is None else it})" for r, it in behind.items()
        )
