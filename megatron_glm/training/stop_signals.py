"""Stop requests: SIGTERM, SIGINT and a launcher that died ask the run to stop after this iteration.

While ``catch_stop_signals`` is in force (from the data loader's start to the end of the loop)
SIGTERM and SIGINT only record a request; the ranks agree on it in the next optimizer step
(training/guards.py), finish that iteration, save and exit 0. Data-loader worker processes forked
meanwhile inherit the handler, so a signal to the whole process group (torchrun sends one) does
not kill them before the save. Outside it (start-up, before anything is worth saving) the
signals keep their usual effect. Repeating the signal does not escalate: DeepSpeed's launcher turns one Ctrl-C into a
SIGINT and a SIGTERM; SIGKILL, which launchers send after their grace period, always works.

How each launcher's signal reaches the ranks (DeepSpeed 0.19.8, torch 2.13):

- ``torchrun`` forwards SIGTERM/SIGINT to every rank's process group, then SIGKILLs it after
  30 s.
- DeepSpeed's per-node ``deepspeed.launcher.launch`` sends SIGTERM to each rank's process tree
  in turn, waiting up to 30 s for each before SIGKILL; the first rank's request is enough, the
  others join it at the next agreement.
- The ``deepspeed`` runner on a single node installs no handler: SIGTERM kills it and nothing is
  forwarded. ``watch_launcher`` covers that: every rank polls its parent and, when the parent is
  DeepSpeed's ``launch``, the runner above it; when one is gone it sends itself SIGTERM.
  ``launch`` then sees every rank exit 0 and exits too, so no process is left.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"

_requested = threading.Event()


def stop_requested() -> bool:
    return _requested.is_set()


def _record_request(signum: int, frame: object) -> None:
    if not _requested.is_set():
        logger.warning(
            "%s received: finishing this iteration, then saving and exiting",
            signal.Signals(signum).name,
        )
    _requested.set()


def catch_stop_signals() -> Callable[[], None]:
    """Make SIGTERM/SIGINT stop requests until the returned function restores the previous
    handlers. Main thread only (Python delivers signals there); elsewhere, e.g. in a test
    harness thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_request)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


# ---- the launcher's liveness ------------------------------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux), None if there is no such
    process. The name is in parentheses and may contain anything, so split after the last ')'."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live process from a reused PID), None when it
    does not exist, has exited (a zombie waiting for its parent) or /proc is not there."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":  # fields[0] is stat's field 3, the state
        return None
    return fields[19]  # field 22


def _parent_of(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def launcher_processes() -> list[tuple[int, str | None]]:
    """(PID, start time) of the processes whose death stops this rank: the parent and, when it is
    DeepSpeed's per-node ``launch``, the ``deepspeed`` runner that started it."""
    parent = os.getppid()
    watched = [(parent, process_start_time(parent))]
    if _DEEPSPEED_NODE_LAUNCHER in _cmdline(parent):
        runner = _parent_of(parent)
        if runner is not None and runner > 1:
            watched.append((runner, process_start_time(runner)))
    return watched


def _alive(pid: int, start_time: str | None) -> bool:
    if start_time is not None:  # /proc: the same process, not a new one with its PID
        return process_start_time(pid) == start_time
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_launcher(poll_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that sends this process SIGTERM once a launcher process is gone (a
    stop request while ``catch_stop_signals`` is in force, else the end). The parent counts as gone when this
    process was re-parented (``getppid`` changed), which also works without /proc."""
    parent = os.getppid()
    watched = launcher_processes()

    def watch() -> None:
        while True:
            gone = [pid for pid, start in watched[1:] if not _alive(pid, start)]
            if os.getppid() != parent:
                gone.insert(0, parent)
            if gone:
                logger.warning(
                    "launcher process(es) %s gone: stopping this rank",
                    ", ".join(map(str, gone)),
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return
            _requested.wait(poll_s)
            if _requested.is_set():
                return  # already stopping

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
