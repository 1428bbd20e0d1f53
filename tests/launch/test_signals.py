"""Jobs that are killed, signalled or hung, under the real launchers (docs/failure-semantics.md).

- ``torchrun --max-restarts=1`` with rank 1 SIGKILLed after iteration 4 (a checkpoint every 2):
  torchrun restarts the job, it resumes from iteration 4, and the losses of the whole run are
  those of an uninterrupted run, bit for bit.
- SIGTERM to the ``deepspeed`` runner mid-run (which forwards nothing on one node): every rank
  notices, finishes its iteration, saves and exits; no process of the job is left; the same
  command then finishes the run with the uninterrupted losses, bit for bit.
- A rank that sleeps past ``--distributed-timeout-minutes``: rank 0 exits with status 5 within the
  timeout and a few seconds, naming rank 1; rank 1 exits by itself when it wakes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_glm.training.checkpointing import find_latest_checkpoint
from megatron_glm.training.faults import FAULT_ENV
from megatron_glm.training.guards import ExitCode
from tests.distributed.harness import find_free_port
from tests.launch.launchers import (
    BIN,
    REPO_ROOT,
    describe,
    launcher_commands,
    run_launcher,
)

pytestmark = pytest.mark.slow

ITERS = 10
SCRIPT = REPO_ROOT / "pretrain_glm.py"


def _losses(log: Path) -> dict[int, str]:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss_hex"] for r in records if r["kind"] == "train"}


def _steps(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [
        json.loads(line)["step"]
        for line in log.read_text().splitlines()
        if line.strip() and json.loads(line)["kind"] == "train"
    ]


def _torchrun(args: list[str], max_restarts: int = 0) -> list[list[str]]:
    return [
        [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "2",
            "--max-restarts",
            str(max_restarts),
            "--master-port",
            str(find_free_port()),
            str(SCRIPT),
            *args,
        ]
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory: pytest.TempPathFactory) -> dict[int, str]:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    runs = run_launcher(_torchrun(tiny_corpus.trainer_args(workdir, ITERS)), workdir, timeout=240)
    assert runs[0].returncode == 0, describe(runs)
    losses = _losses(workdir / "log.jsonl")
    assert sorted(losses) == list(range(1, ITERS + 1))
    return losses


def test_torchrun_restart_after_a_killed_rank_is_bitwise_exact(
    tiny_corpus, uninterrupted: dict[int, str], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    args = tiny_corpus.trainer_args(tmp_path, ITERS)
    args += ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2"]
    fault = {FAULT_ENV: "step.end:kill@rank=1,iteration=4"}
    runs = run_launcher(_torchrun(args, max_restarts=1), tmp_path, timeout=300, env=fault)
    assert runs[0].returncode == 0, describe(runs)
    assert "resumed from" in runs[0].output and "iteration 4" in runs[0].output, describe(runs)
    assert _steps(tmp_path / "log.jsonl") == list(range(1, ITERS + 1))
    assert _losses(tmp_path / "log.jsonl") == uninterrupted


def _live_members(pgid: int) -> list[str]:
    """Processes of the process group ``pgid`` that are not zombies, as 'PID command'."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_file.read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(f"{stat_file.parent.name} {stat[: stat.rindex(')') + 1]}")
    return out


def test_sigterm_to_the_deepspeed_runner_saves_and_leaves_nothing(
    tiny_corpus, uninterrupted: dict[int, str], tmp_path: Path
) -> None:
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    args = tiny_corpus.trainer_args(tmp_path, ITERS) + ["--save", str(ckpt), "--load", str(ckpt)]
    (command,) = launcher_commands("deepspeed", SCRIPT, args, tmp_path)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        FAULT_ENV: "step.start:sleep=0.5",  # slow enough to be caught mid-run
    }
    output = tmp_path / "first.log"
    with output.open("wb") as out:
        runner = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while len(_steps(log)) < 2 and runner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runner.poll() is None and len(_steps(log)) >= 2, output.read_text()[-4000:]
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(10) == -signal.SIGTERM
        deadline = time.monotonic() + 90
        while _live_members(runner.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _live_members(runner.pid)
        assert not left, f"left running: {left}\n{output.read_text()[-4000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
    first = output.read_text()
    stopped_at = _steps(log)[-1]
    assert 2 <= stopped_at < ITERS, first[-4000:]
    assert f"stop requested: saving at iteration {stopped_at}" in first, first[-4000:]
    assert "Traceback" not in first, first[-4000:]
    latest = find_latest_checkpoint(ckpt)
    assert latest is not None and latest.iteration == stopped_at

    # the documented relaunch: the same command
    runs = run_launcher(launcher_commands("deepspeed", SCRIPT, args, tmp_path), tmp_path, 240)
    assert runs[0].returncode == 0, describe(runs)
    assert _steps(log) == list(range(1, ITERS + 1))
    assert _losses(log) == uninterrupted


TIMEOUT_S = 15


def test_a_hung_rank_makes_the_others_fail_within_the_timeout(tiny_corpus, tmp_path: Path) -> None:
    args = tiny_corpus.trainer_args(tmp_path, 4)
    args += ["--distributed-timeout-minutes", str(TIMEOUT_S / 60)]
    port = str(find_free_port())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": "2",
        # rank 1 stalls before iteration 2 for longer than the timeout, then carries on
        FAULT_ENV: f"step.start:sleep={TIMEOUT_S + 10}@rank=1,iteration=2",
    }
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    ranks = []
    for rank, log in enumerate(logs):
        with log.open("wb") as out:
            ranks.append(
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), *args],
                    cwd=tmp_path,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        deadline = time.monotonic() + 240
        while _steps(tmp_path / "log.jsonl") != [1] and time.monotonic() < deadline:
            time.sleep(0.1)
        waiting_since = time.monotonic()  # rank 0 is in iteration 2, waiting for rank 1
        assert ranks[0].wait(TIMEOUT_S + 30) == ExitCode.PEER_TIMEOUT, logs[0].read_text()
        waited = time.monotonic() - waiting_since
        # rank 1 wakes up, finds rank 0 gone and exits by itself
        assert ranks[1].wait(30) != 0
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert TIMEOUT_S - 1 < waited < TIMEOUT_S + 8, waited
    rank0 = logs[0].read_text()
    assert "waited more than --distributed-timeout-minutes 0.25" in rank0, rank0[-3000:]
    assert "rank(s) behind iteration 2: rank 1 (last started 1)" in rank0, rank0[-3000:]
