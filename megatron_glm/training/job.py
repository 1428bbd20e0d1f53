"""One training job, from a validated command line to its exit status.

``run_job`` watches the launcher if there is one (training/stop_signals.py), starts ``torch.distributed`` with the
collective timeout of ``--distributed-timeout-minutes``, claims ``--save`` (every rank probes it
for writing, global rank 0 locks it; training/run_lock.py), trains, and turns the outcome into
one of the exit statuses of ``guards.ExitCode`` (docs/failure-semantics.md). Failures that every
rank sees alike (a broken run, an unusable ``--save``, a checkpoint that cannot be loaded) are
printed by rank 0; a collective timeout is printed by each rank that waited, with the ranks
that were behind.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

from megatron_glm.training.arguments import RunConfig
from megatron_glm.training.guards import ExitCode, TrainingBroken
from megatron_glm.training.launch import (
    LaunchEnv,
    ProgressBoard,
    init_distributed,
    is_collective_timeout,
    shutdown_distributed,
)
from megatron_glm.training.run_lock import RunLock, SaveDirError, SaveDirLocked, probe_save_dir
from megatron_glm.training.stop_signals import watch_launcher

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def claim_save_dir(save: str | None) -> Iterator[RunLock | None]:
    """Probe ``save`` on every rank and lock it on rank 0; every rank raises the first problem
    any rank found (``SaveDirError`` or ``SaveDirLocked``). The lock is released on exit."""
    if not save:
        yield None
        return
    rank = dist.get_rank()
    lock = None
    problem: tuple[str, str] | None = None
    try:
        probe_save_dir(save)
        if rank == 0:
            lock = RunLock.acquire(save)
    except SaveDirError as err:
        problem = ("unusable", str(err))
    except SaveDirLocked as err:
        problem = ("locked", str(err))
    problems: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [(r, p) for r, p in enumerate(problems) if p is not None]
    if found:
        if lock is not None:
            lock.release()
        r, (kind, message) = found[0]
        message = message if r == 0 else f"rank {r}: {message}"
        raise (SaveDirLocked if kind == "locked" else SaveDirError)(message)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def run_job(
    run: RunConfig,
    launch: LaunchEnv,
    train: Callable[[RunConfig], Any] | None = None,
    program: str = "pretrain_glm.py",
) -> int:
    """Train ``run`` with ``train`` (pretraining when None; ``tasks.finetune.finetune`` for
    finetune_glm.py); returns the exit status. Every rank calls it, after ``build_run_config``.
    Messages are prefixed with ``program``.

    The launcher is watched only when there is one: a lone ``python pretrain_glm.py`` started
    with ``nohup`` must outlive its shell."""
    from megatron_glm.conversion import CheckpointError
    from megatron_glm.tasks.data import TaskDataError
    from megatron_glm.training.checkpointing import LoadDirError
    from megatron_glm.training.loop import pretrain

    def _report(rank: int, message: str, *, every_rank: bool = False) -> None:
        if every_rank or rank == 0:
            print(f"{program}: {message}", file=sys.stderr, flush=True)

    if launch.launcher != "single":
        watch_launcher()
    rank = launch.rank
    init_distributed(
        run.training.distributed_backend,
        timeout_s=run.failure.distributed_timeout_minutes * 60.0,
    )
    agreed = False  # every rank ends the same way: the final barrier is safe
    try:
        with claim_save_dir(run.training.save):
            (train or pretrain)(run)
        agreed = True
        return ExitCode.OK
    except TrainingBroken as err:
        agreed = True
        _report(rank, str(err))
        return ExitCode.BROKEN
    except (CheckpointError, LoadDirError, SaveDirError, TaskDataError) as err:
        # found on every rank alike (rank 0 read the files and told the others): a user error
        # like those of the command line, so the same exit status
        agreed = True
        _report(rank, str(err))
        return ExitCode.BAD_INPUT
    except SaveDirLocked as err:
        agreed = True
        _report(rank, str(err))
        return ExitCode.SAVE_LOCKED
    except RuntimeError as err:
        if not is_collective_timeout(err):
            raise
        minutes = run.failure.distributed_timeout_minutes
        _report(
            rank,
            f"a collective waited more than --distributed-timeout-minutes {minutes:g} for a "
            f"peer ({err}); {ProgressBoard.of_default_group().describe()}",
            every_rank=True,
        )
        return ExitCode.PEER_TIMEOUT
    finally:
        # A barrier before tearing down, but only when every rank got here the same way.
        shutdown_distributed(synchronize=agreed)
