"""Start a script under a real launcher (deepspeed, torchrun, mpirun; one or two "nodes" on
loopback), bounded by a timeout, and collect every launcher process's output.

Each launcher process runs in its own session (process group), so a hang or a failure kills the
launcher and every rank it started, and nothing outlives the test. The command lines here are the
ones docs/launching.md documents.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.distributed.harness import find_free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# name -> (number of launcher processes, ranks per launcher process)
LAUNCHERS = {
    "deepspeed": (1, 2),
    "torchrun": (1, 2),
    "mpirun": (1, 2),
    "torchrun-2node": (2, 1),
    "deepspeed-2node": (2, 1),
}


@dataclass
class LauncherRun:
    command: list[str]
    returncode: int
    killed: bool  # still running at the timeout, or after another node's launcher failed
    output: str


def launcher_commands(
    launcher: str,
    script: Path,
    script_args: list[str],
    workdir: Path,
    forward_env: tuple[str, ...] = (),
) -> list[list[str]]:
    """One command per node for ``launcher`` (a key of ``LAUNCHERS``) on 127.0.0.1.

    ``forward_env`` names variables that mpirun must pass on (the others inherit the environment).
    """
    port = str(find_free_port())
    python_script = [str(script), *script_args]
    if launcher == "deepspeed":
        # On CPU the runner counts NUMA nodes as "devices"; --num_gpus sets the process count.
        return [[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, *python_script]]
    if launcher == "torchrun":
        return [
            [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", port, *python_script]
        ]
    if launcher == "mpirun":
        forwarded = [
            arg for name in ("OMP_NUM_THREADS", "PYTHONPATH", *forward_env) for arg in ("-x", name)
        ]
        return [
            [
                str(BIN / "mpirun"),
                "-np",
                "2",
                "--oversubscribe",
                "--allow-run-as-root",
                *forwarded,
                "-x",
                f"MASTER_PORT={port}",
                sys.executable,
                *python_script,
            ]
        ]
    if launcher == "torchrun-2node":
        # Static rendezvous: --node-rank decides which node holds rank 0 (c10d ignores it).
        return [
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                *python_script,
            ]
            for node in range(2)
        ]
    if launcher == "deepspeed-2node":
        hostfile = workdir / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        # --no_ssh: each node's launcher is started by hand (here: both on this machine).
        return [
            [
                str(BIN / "deepspeed"),
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                *python_script,
            ]
            for node in range(2)
        ]
    raise ValueError(f"unknown launcher {launcher!r}; choose one of {sorted(LAUNCHERS)}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def run_launcher(
    commands: list[list[str]], workdir: Path, timeout: float, env: dict[str, str] | None = None
) -> list[LauncherRun]:
    """Run all ``commands`` at once (one per node); kill every process group at ``timeout`` or
    as soon as one launcher fails (the others would wait for it forever)."""
    environ = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        # Open MPI refuses root without these (CI containers run as root).
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        **(env or {}),
    }
    logs = [workdir / f"launcher{index}.log" for index in range(len(commands))]
    procs: list[subprocess.Popen[bytes]] = []
    killed: list[bool] = []
    try:
        for command, log in zip(commands, logs):
            with log.open("wb") as handle:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=workdir,
                        env=environ,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes) or any(code for code in codes):
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            killed.append(proc.poll() is None)
            if killed[-1]:
                _kill_group(proc)
    return [
        LauncherRun(command, proc.returncode, was_killed, log.read_text(errors="replace"))
        for command, proc, was_killed, log in zip(commands, procs, killed, logs)
    ]


def describe(runs: list[LauncherRun], tail_chars: int = 4000) -> str:
    """The commands, exit codes and output tails, for an assertion message."""
    return "\n".join(
        f"--- {' '.join(run.command)}\n    exit code {run.returncode}"
        f"{' (killed)' if run.killed else ''}\n{run.output[-tail_chars:]}"
        for run in runs
    )
