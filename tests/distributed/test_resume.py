"""Exact resume and crash-safe publishing of checkpoints, through real ``pretrain_glm.py`` runs.

- The same command, relaunched after ``--exit-interval`` stops, continues from the newest
  checkpoint and reproduces the uninterrupted run's losses BIT FOR BIT, with dropout on, at world
  size 1 and 2 (pipeline, ZeRO-1, activation recomputation). Negative control: resuming without
  the RNG streams (``--no-load-rng``) gives different losses.
- A save killed after the shards are written but before publishing leaves ``latest`` on the
  previous complete checkpoint, and the relaunch resumes from it (data parallel, ZeRO-1) and
  again matches the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from megatron_glm.training.checkpointing import COMPLETE_MARKER, find_latest_checkpoint
from tests.training.helpers import Corpus, launch, pretrain_args, read_log, write_ds_config

ITERS = 8


def _args(corpus: Corpus, ds_config: Path, log: Path, extra: list[str]) -> list[str]:
    # dropout stays on (the model default 0.1): the RNG streams matter
    evaluation = ["--eval-interval", "4", "--eval-iters", "1"]
    return pretrain_args(
        corpus, ds_config, log, iters=ITERS, bert_prob=0.5, extra=[*evaluation, *extra]
    )


def _save_and_load(ckpt: Path, *flags: str) -> list[str]:
    """Flags of a run that saves to and resumes from ``ckpt``."""
    return ["--save", str(ckpt), "--load", str(ckpt), *flags]


def _run(
    world_size: int,
    args: list[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    expect_ok: bool = True,
) -> None:
    result = launch(world_size, args, log_dir=tmp, env=env)
    if expect_ok:
        assert result.ok, result.describe()
    else:
        assert not result.ok, "the injected failure did not stop the run"


def _losses(log: Path) -> dict[int, str]:
    return {r["step"]: r["loss_hex"] for r in read_log(log)}


def _eval_losses(log: Path) -> dict[int, Any]:
    with open(log, encoding="utf-8") as f:
        return {r["step"]: r["losses"] for r in map(json.loads, f) if r["kind"] == "eval"}


@pytest.mark.parametrize(
    "world_size, extra, ds",
    [
        (1, [], {"micro": 4}),
        (
            2,
            ["--pipeline-model-parallel-size", "2", "--checkpoint-activations"],
            {"micro": 2, "gas": 2, "zero_stage": 1},
        ),
    ],
    ids=["ws1", "ws2_pp2_zero1_recompute"],
)
def test_exit_and_relaunch_is_bitwise_exact(
    world_size: int, extra: list[str], ds: dict[str, Any], tmp_path: Path, glm_corpus: Corpus
) -> None:
    config = write_ds_config(tmp_path / "ds.json", train_batch=4, **ds)
    straight = tmp_path / "straight.jsonl"
    _run(world_size, _args(glm_corpus, config, straight, extra), tmp_path)

    ckpt, chunked = tmp_path / "ckpt", tmp_path / "chunked.jsonl"
    command = _args(
        glm_corpus, config, chunked, [*extra, *_save_and_load(ckpt, "--exit-interval", "3")]
    )
    _run(world_size, command, tmp_path)  # iterations 1-3, saves 3, stops
    assert find_latest_checkpoint(ckpt).iteration == 3
    if world_size == 1:
        shutil.copytree(ckpt, tmp_path / "ckpt_at_3")
    _run(world_size, command, tmp_path)  # the same command: 4-6
    _run(world_size, command, tmp_path)  # 7-8 (train_iters)
    assert find_latest_checkpoint(ckpt).iteration == ITERS

    want, got = _losses(straight), _losses(chunked)
    assert sorted(want) == sorted(got) == list(range(1, ITERS + 1))
    assert got == want, {s: (got[s], want[s]) for s in want if got[s] != want[s]}
    assert _eval_losses(chunked) == _eval_losses(straight) != {}

    if world_size == 1:  # negative control: the same resume without the RNG streams
        no_rng = tmp_path / "no_rng.jsonl"
        resume_dir = tmp_path / "ckpt_at_3"
        _run(
            1,
            _args(glm_corpus, config, no_rng, ["--load", str(resume_dir), "--no-load-rng"]),
            tmp_path,
        )
        diverged = _losses(no_rng)
        assert sorted(diverged) == list(range(4, ITERS + 1))
        assert diverged[4] != want[4], "resuming without RNG state should change the dropout"


@pytest.mark.parametrize("mode", ["kill"])
def test_interrupted_save_is_never_published(mode: str, tmp_path: Path, glm_corpus: Corpus) -> None:
    config = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=2, zero_stage=1)
    straight = tmp_path / "straight.jsonl"
    _run(2, _args(glm_corpus, config, straight, []), tmp_path)

    ckpt, log = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    command = _args(glm_corpus, config, log, _save_and_load(ckpt, "--save-interval", "2"))
    fault = {
        "MEGATRON_GLM_HOOKS": "tests.training.fault_hooks:install",
        "FAULT_SAVE_ITERATION": "4",
        "FAULT_MODE": mode,
    }
    _run(2, command, tmp_path, env=fault, expect_ok=False)

    assert (ckpt / "latest").read_text() == "2"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (ckpt / "4").is_dir() and not (ckpt / "4" / COMPLETE_MARKER).exists()
    assert find_latest_checkpoint(ckpt).iteration == 2

    _run(2, command, tmp_path)  # the same command without the fault resumes from 2
    steps = [r["step"] for r in read_log(log)]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]  # 3-4 ran twice: before the crash and after
    want, got = _losses(straight), {r["step"]: r["loss_hex"] for r in read_log(log)[4:]}
    assert got == {s: want[s] for s in range(3, ITERS + 1)}
    assert (ckpt / "latest").read_text() == str(ITERS)
    assert (ckpt / "4" / COMPLETE_MARKER).exists()  # re-saved cleanly this time
