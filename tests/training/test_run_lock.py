"""``--save`` ownership and stop requests, without a trainer (megatron_glm/training/run_lock.py,
megatron_glm/training/stop_signals.py).

- A live job's lock refuses a second job; the lock of a dead job (its PID gone, or reused by
  another process, or on another host with a stale heartbeat) is taken over; a fresh heartbeat
  from another host is respected; the heartbeat moves the lock's time.
- ``probe_save_dir`` names the directory that cannot be created.
- ``pretrain_glm.py`` exits with status 4 on a --save owned by a live job, and with status 2 on a
  --save that cannot be created, before any iteration.
- SIGTERM/SIGINT become stop requests while caught, and a rank whose launcher was SIGKILLed
  stops by itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.training import stop_signals
from megatron_glm.training.guards import ExitCode
from megatron_glm.training.run_lock import (
    LOCK_FILE,
    RunLock,
    SaveDirError,
    SaveDirLocked,
    probe_save_dir,
)
from megatron_glm.training.stop_signals import catch_stop_signals, process_start_time
from tests.training.helpers import REPO, Corpus, launch, pretrain_args, write_ds_config

HOLD = (
    "import sys, time\n"
    "from megatron_glm.training.run_lock import RunLock\n"
    "RunLock.acquire(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def _holder(save: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(save)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_live_job_is_refused_and_a_dead_one_taken_over(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(SaveDirLocked, match=f"PID {holder.pid} on host"):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with RunLock.acquire(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.holder.pid == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()  # released
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left aside


def _write_lock(save: Path, *, host: str, pid: int, start_time: str | None, age_s: float) -> None:
    record = {
        "host": host,
        "pid": pid,
        "start_time": start_time,
        "job_id": "old",
        "started": "2026-01-01T00:00:00+0000",
    }
    path = save / LOCK_FILE
    path.write_text(json.dumps(record))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_a_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    # this very process, but with another start time: the PID was reused after the owner died
    _write_lock(tmp_path, host=os.uname().nodename, pid=os.getpid(), start_time="1", age_s=0)
    assert process_start_time(os.getpid()) != "1"
    RunLock.acquire(tmp_path).release()


def test_another_host_owns_the_lock_until_its_heartbeat_is_stale(tmp_path: Path) -> None:
    _write_lock(tmp_path, host="elsewhere", pid=1, start_time=None, age_s=5)
    with pytest.raises(SaveDirLocked, match="host elsewhere.*last heartbeat 5 s ago"):
        RunLock.acquire(tmp_path, stale_after_s=30)
    _write_lock(tmp_path, host="elsewhere", pid=1, start_time=None, age_s=31)
    RunLock.acquire(tmp_path, stale_after_s=30).release()


def test_heartbeat_refreshes_the_lock(tmp_path: Path) -> None:
    lock = RunLock.acquire(tmp_path, heartbeat_s=0.05)
    try:
        path = tmp_path / LOCK_FILE
        os.utime(path, (0, 0))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > time.time() - 60
    finally:
        lock.release()


def test_probe_names_the_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SaveDirError, match=f"--save {blocker / 'ckpt'} cannot be created"):
        probe_save_dir(blocker / "ckpt")
    probe_save_dir(tmp_path / "new" / "ckpt")
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []


def test_signals_become_stop_requests_while_caught() -> None:
    assert not stop_signals.stop_requested()
    restore = catch_stop_signals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop_signals.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop_signals.stop_requested()
    finally:
        restore()
        stop_signals._requested.clear()  # noqa: SLF001 - process-wide state of this test
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# A "launcher" (the outer python) starts a "rank" that watches it and waits for a stop request.
RANK = (
    "import sys, time\n"
    "from megatron_glm.training import stop_signals\n"
    "stop_signals.catch_stop_signals()\n"
    "stop_signals.watch_launcher(poll_s=0.1)\n"
    "print('ready', flush=True)\n"
    "deadline = time.monotonic() + 60\n"
    "while not stop_signals.stop_requested() and time.monotonic() < deadline:\n"
    "    time.sleep(0.05)\n"
    "open(sys.argv[1], 'w').write('stopped' if stop_signals.stop_requested() else 'timeout')\n"
)
LAUNCHER = (
    "import subprocess, sys\n"
    "rank = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]],"
    " stdout=subprocess.PIPE, text=True)\n"
    "print(rank.pid, rank.stdout.readline().strip(), flush=True)\n"
    "rank.wait()\n"
)


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's exit status may wait for init to collect it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_a_rank_whose_launcher_dies_stops(tmp_path: Path) -> None:
    marker = tmp_path / "rank_done"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, RANK, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert launcher.stdout is not None
    rank_pid, state = launcher.stdout.readline().split()
    assert state == "ready"
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 20
    while _running(int(rank_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _running(int(rank_pid))
    if alive:
        os.kill(int(rank_pid), signal.SIGKILL)
    assert not alive, "the rank outlived its launcher"
    assert marker.read_text() == "stopped"


def test_pretrain_refuses_a_locked_or_unusable_save(glm_corpus: Corpus, tmp_path: Path) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=2, micro=2)
    log = tmp_path / "log.jsonl"
    save = tmp_path / "ckpt"
    save.mkdir()
    holder = _holder(save)  # another job, alive
    try:
        args = pretrain_args(
            glm_corpus, ds, log, iters=2, bert_prob=0.5, extra=["--save", str(save)]
        )
        locked = launch(1, args, log_dir=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert locked.returncodes == [ExitCode.SAVE_LOCKED], locked.describe()
    assert f"--save {save} is in use by another job: PID {holder.pid}" in locked.outputs[0]

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "ckpt"
    args = pretrain_args(glm_corpus, ds, log, iters=2, bert_prob=0.5, extra=["--save", str(bad)])
    unusable = launch(1, args, log_dir=tmp_path)
    assert unusable.returncodes == [ExitCode.BAD_INPUT], unusable.describe()
    assert f"--save {bad} cannot be created" in unusable.outputs[0]
    assert not log.exists()  # no iteration ran in either job
