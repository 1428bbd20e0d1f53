"""Run a function on N gloo ranks in fresh processes; the multi-process test harness.

Usage (the function must be importable, i.e. defined at module level of a test module)::

    from tests.distributed.harness import run_distributed

    def _check(rank: int, world_size: int, scale: float) -> float:
        t = torch.full((1,), float(rank))
        torch.distributed.all_reduce(t)
        return t.item() * scale

    def test_all_reduce():
        assert run_distributed(_check, 2, 10.0) == [10.0, 10.0]

Each rank runs in a process of the ``spawn`` start method (a clean interpreter: no forked torch
state) with ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK`` set, one intra-op thread, and a
gloo default process group already initialised. The list of per-rank return values comes back in
rank order. Any rank that raises fails the run with that rank's traceback; a rank that dies without
reporting or a run that exceeds ``timeout`` seconds kills every rank and fails with a clear error.
Test-only code: results travel through a queue as ``torch.save`` bytes (pickle), which is fine
between processes this harness started itself.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import closing
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "DistributedTimeoutError", "find_free_port", "run_distributed"]

# How long to keep collecting reports from the other ranks once one rank has failed: the
# survivors usually block in a collective with the dead rank, so waiting longer only wastes time.
_FAILURE_GRACE_S = 2.0
_POLL_S = 0.05
_PORT_RETRIES = 3


class DistributedRunError(AssertionError):
    """A rank raised or died; the message holds every failing rank's traceback."""


class DistributedTimeoutError(DistributedRunError):
    """The ranks did not all finish within the timeout (a hang, usually a mismatched collective)."""


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago (the OS picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return int(sock.getsockname()[1])


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    # torch.save keeps tensors by value (no shared-memory handles that die with the child).
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    # Results are tensors and plain containers/numbers/strings: nothing needs unpickling code.
    return torch.load(io.BytesIO(data), weights_only=True)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    results: Any,
) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    initialised = False
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method="env://")
        initialised = True
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, _to_bytes(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if initialised and dist.is_initialized():
            dist.destroy_process_group()


def _kill(processes: list[Any]) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 2.0
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def _run_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    timeout: float,
) -> tuple[list[Any] | None, dict[int, str], str | None]:
    """One attempt. Returns (results, failures, timeout message)."""
    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    port = find_free_port()
    # OMP_NUM_THREADS must be in the environment before the child imports torch, which happens
    # while it unpickles `fn`; spawned children copy the parent's environment at start().
    saved_omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    processes = []
    try:
        for rank in range(world_size):
            proc = ctx.Process(
                target=_worker,
                args=(rank, world_size, port, fn, args, kwargs, results_queue),
                name=f"rank{rank}",
                daemon=True,
            )
            processes.append(proc)
            proc.start()
    except BaseException:
        # e.g. `fn` is not picklable (a lambda or closure): do not leave started ranks behind.
        _kill([p for p in processes if p.pid is not None])
        raise
    finally:
        if saved_omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved_omp

    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    start = time.monotonic()
    first_failure: float | None = None
    timeout_message: str | None = None
    try:
        while len(values) + len(failures) < world_size:
            now = time.monotonic()
            if first_failure is not None and now - first_failure > _FAILURE_GRACE_S:
                break
            if now - start > timeout:
                pending = sorted(set(range(world_size)) - values.keys() - failures.keys())
                timeout_message = (
                    f"run_distributed({getattr(fn, '__name__', fn)!s}, world_size={world_size}): "
                    f"ranks {pending} did not finish within timeout={timeout} s; all ranks killed "
                    "(a hang: usually a collective that not every rank called)"
                )
                break
            try:
                rank, ok, payload = results_queue.get(timeout=_POLL_S)
            except queue.Empty:
                # A rank that died without reporting (segfault, os._exit, OOM kill).
                for rank, proc in enumerate(processes):
                    reported = rank in values or rank in failures
                    if not reported and not proc.is_alive() and proc.exitcode is not None:
                        # Its report may still be in flight: give the queue one more chance.
                        time.sleep(_POLL_S)
                        if results_queue.empty():
                            failures[rank] = (
                                f"rank {rank} exited with code {proc.exitcode} without reporting"
                            )
                            first_failure = first_failure or time.monotonic()
                continue
            if ok:
                values[rank] = _from_bytes(payload)
            else:
                failures[rank] = payload
                first_failure = first_failure or time.monotonic()
    finally:
        _kill(processes)
        results_queue.close()
    if failures or timeout_message:
        return None, failures, timeout_message
    return [values[rank] for rank in range(world_size)], {}, None


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Call ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Returns the per-rank return values in rank order (they must be picklable). Raises
    ``DistributedRunError`` (an ``AssertionError``, so pytest shows it as a failure) with the
    traceback of every rank that raised, or ``DistributedTimeoutError`` after ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    for attempt in range(_PORT_RETRIES):
        values, failures, timeout_message = _run_once(fn, world_size, args, kwargs, timeout)
        if values is not None:
            return values
        # Another process can grab the port between find_free_port() and the rendezvous.
        port_clash = any("address already in use" in tb.lower() for tb in failures.values())
        if port_clash and attempt + 1 < _PORT_RETRIES:
            continue
        if timeout_message is not None:
            details = "".join(
                f"\n--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items())
            )
            raise DistributedTimeoutError(timeout_message + details)
        details = "".join(f"\n--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items()))
        raise DistributedRunError(
            f"run_distributed({getattr(fn, '__name__', fn)!s}, world_size={world_size}): "
            f"rank(s) {sorted(failures)} failed{details}"
        )
    raise AssertionError("unreachable")  # pragma: no cover
