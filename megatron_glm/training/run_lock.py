"""``--save`` belongs to one job: checked for writing and locked before the first iteration.

``probe_save_dir`` creates the directory and writes, syncs and deletes a small file in it (every
rank does, since every rank writes its own checkpoint files), so an unwritable or invalid
``--save`` fails at start-up naming the directory, not at the first save.

``RunLock`` is the file ``LOCK_FILE`` in ``--save``, created exclusively by global rank 0. It holds
the owner's host, PID, process start time and a random id; its modification time is the
heartbeat, refreshed every ``heartbeat_s`` by a daemon thread. A second job finding it refuses
to start while the owner lives. The owner is dead when, on the same host, no process with that
PID and start time exists (a reused PID does not count), or, on another host, the heartbeat is
older than ``stale_after_s``. A dead owner's lock is moved aside and replaced; a job that finds
its own lock replaced (only possible after its heartbeat stalled for ``stale_after_s``) says so
in the log. The lock is deleted when the job ends, also after an error; after SIGKILL it stays
and the next job takes it over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_glm.training.stop_signals import process_start_time

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class SaveDirError(ValueError):
    """``--save`` cannot be created or written."""


class SaveDirLocked(RuntimeError):
    """Another live job owns ``--save``."""


def probe_save_dir(save_dir: str | Path) -> None:
    """Create ``save_dir`` and check that a file can be written, synced and deleted in it."""
    root = Path(save_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveDirError(f"--save {root} cannot be created: {err.strerror or err}") from None
    if not root.is_dir():
        raise SaveDirError(f"--save {root} is not a directory")
    probe = root / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"megatron_glm write probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise SaveDirError(
            f"--save {root} is not writable: {err.strerror or err} ({probe})"
        ) from None


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    start_time: str | None
    job_id: str
    started: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            start_time=process_start_time(os.getpid()),
            job_id=uuid.uuid4().hex,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def describe(self) -> str:
        return f"PID {self.pid} on host {self.host} (started {self.started})"


def _read(path: Path) -> tuple[bytes, float] | None:
    """The lock file's bytes and modification time; None when it is gone."""
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None


def _holder(raw: bytes) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(raw))
    except (ValueError, TypeError):
        return None  # being written, or not ours


def _owner_alive(holder: LockHolder | None, age_s: float, stale_after_s: float) -> bool:
    if holder is None or holder.host != socket.gethostname():
        return age_s < stale_after_s
    if holder.start_time is not None:  # /proc: a reused PID is another process
        return process_start_time(holder.pid) == holder.start_time
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one job on its ``--save`` directory (see the module docstring)."""

    def __init__(self, path: Path, holder: LockHolder, heartbeat_s: float) -> None:
        self.path = path
        self.holder = holder
        self._raw = json.dumps(holder.__dict__).encode()
        self._stop = threading.Event()
        self._beat = threading.Thread(
            target=self._heartbeat, args=(heartbeat_s,), name="run-lock-heartbeat", daemon=True
        )

    @classmethod
    def acquire(
        cls,
        save_dir: str | Path,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> RunLock:
        path = Path(save_dir) / LOCK_FILE
        lock = cls(path, LockHolder.this_process(), heartbeat_s)
        for _ in range(10):  # each round either creates the file or removes a dead owner's
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                lock._take_over_if_dead(stale_after_s)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(lock._raw)
                f.flush()
                os.fsync(f.fileno())
            lock._beat.start()
            return lock
        raise SaveDirLocked(f"--save {path.parent}: could not take {path} (contended)")

    def _take_over_if_dead(self, stale_after_s: float) -> None:
        seen = _read(self.path)
        if seen is None:
            return  # released meanwhile
        raw, mtime = seen
        holder, age = _holder(raw), time.time() - mtime
        if _owner_alive(holder, age, stale_after_s):
            who = holder.describe() if holder is not None else "a job that is writing it"
            raise SaveDirLocked(
                f"--save {self.path.parent} is in use by another job: {who}, last heartbeat "
                f"{age:.0f} s ago ({self.path}). Stop that job first or pass another --save; "
                f"a lock whose owner is dead is taken over (on the same host at once, from "
                f"another host after {stale_after_s:.0f} s without heartbeat)"
            )
        aside = self.path.with_name(f"{LOCK_FILE}.dead-{self.holder.job_id}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another job removed it first
        moved = _read(aside)
        if moved is not None and moved[0] != raw:
            # another job replaced the dead lock between our read and our rename: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink()
            raise SaveDirLocked(
                f"--save {self.path.parent}: another job took over {self.path} at the same time"
            )
        aside.unlink()
        logger.warning(
            "--save %s: taking over the lock of a job that is gone (%s, last heartbeat %.0f s ago)",
            self.path.parent,
            holder.describe() if holder is not None else "unreadable lock file",
            age,
        )

    def _owned(self) -> bool:
        seen = _read(self.path)
        return seen is not None and seen[0] == self._raw

    def _heartbeat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            if not self._owned():
                logger.error(
                    "--save %s: the lock %s is no longer this job's (another job took it over "
                    "after this one's heartbeat stalled); two jobs may now write there",
                    self.path.parent,
                    self.path,
                )
                return
            os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat.is_alive():
            self._beat.join()
        if self._owned():
            self.path.unlink()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
