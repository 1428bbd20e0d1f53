"""Resuming on another cluster shape continues the original run (docs/checkpoints.md,
"Resuming on another layout"), through real ``pretrain_glm.py`` processes.

The original layout, TP2 x PP2 x DP2 with ZeRO 1 (8 processes), trains ``ITERS`` iterations
straight and saves at ``SAVED_AT`` on the way. Its iteration-3 checkpoint is then resumed at
TP1 x PP1 x DP4 (ZeRO 1), at TP4 (ZeRO 0: the plain torch optimizer), at TP2 x DP2 with ZeRO 2
and at DP2 with ZeRO 3; each continuation must log iterations 4..ITERS with the straight run's
losses within fp32 1e-5 relative, its learning rates and consumed-sample counts, and gradient
norms within 1e-4. fp32, dropout 0, one objective (bert) and micro batch 1 everywhere, so every
layout sees the same samples with the same masks (tests/distributed/test_layouts.py).

Negative control: the same resume without the optimizer state (``--no-load-optim``) starts from
the same weights (iteration 4 agrees) but not with the same update (iteration 5 does not), so the
comparison sees the Adam moments. A changed global batch is refused, with a message saying why.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from megatron_glm.training.checkpointing import LATEST_FILE, LATEST_ITERATION_FILE
from megatron_glm.training.reshard import LAYOUT_FREE_DIR, STATE_FILE
from tests.training.helpers import Corpus, launch, pretrain_args, read_log, write_ds_config

ITERS = 6
SAVED_AT = 3
GLOBAL_BATCH = 4
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4

ORIGINAL = (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
ORIGINAL_DS = {"micro": 1, "gas": 2, "zero_stage": 1}

# name -> (world size, layout flags, DeepSpeed batch/ZeRO settings); global batch 4 throughout
TARGETS: dict[str, tuple[int, list[str], dict[str, Any]]] = {
    "tp1_pp1_dp4_zero1": (4, [], {"micro": 1, "gas": 1, "zero_stage": 1}),
    "tp4_zero0": (4, ["--tensor-model-parallel-size", "4"], {"micro": 1, "gas": 4}),
    "tp2_dp2_zero2": (
        4,
        ["--tensor-model-parallel-size", "2"],
        {"micro": 1, "gas": 2, "zero_stage": 2},
    ),
    "dp2_zero3": (2, [], {"micro": 1, "gas": 2, "zero_stage": 3}),
}


def _args(corpus: Corpus, ds_config: Path, log: Path, extra: list[str]) -> list[str]:
    dropout_off = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    return pretrain_args(
        corpus, ds_config, log, iters=ITERS, bert_prob=1.0, extra=[*dropout_off, *extra]
    )


def _records(log: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in read_log(log)}


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, glm_corpus: Corpus) -> dict[str, Any]:
    """The straight run of the original layout, and a directory holding only its checkpoint at
    ``SAVED_AT`` (the resumes read it; none of them saves)."""
    tmp = tmp_path_factory.mktemp("reshard")
    config = write_ds_config(tmp / "original.json", train_batch=GLOBAL_BATCH, **ORIGINAL_DS)
    world_size, flags = ORIGINAL
    ckpt, log = tmp / "ckpt", tmp / "original.jsonl"
    saving = ["--save", str(ckpt), "--save-interval", str(SAVED_AT)]
    result = launch(world_size, _args(glm_corpus, config, log, [*flags, *saving]), log_dir=tmp)
    assert result.ok, result.describe()
    records = _records(log)
    assert sorted(records) == list(range(1, ITERS + 1))

    resume_dir = tmp / "resume_from"
    shutil.copytree(ckpt / str(SAVED_AT), resume_dir / str(SAVED_AT))
    for name in (LATEST_FILE, LATEST_ITERATION_FILE):
        (resume_dir / name).write_text(str(SAVED_AT))
    return {"records": records, "resume_dir": resume_dir, "tmp": tmp}


def _resume(
    original: dict[str, Any],
    corpus: Corpus,
    name: str,
    world_size: int,
    flags: list[str],
    ds: dict[str, Any],
    extra: tuple[str, ...] = (),
    train_batch: int = GLOBAL_BATCH,
) -> tuple[Any, Path]:
    tmp: Path = original["tmp"]
    config = write_ds_config(tmp / f"{name}.json", train_batch=train_batch, **ds)
    log = tmp / f"{name}.jsonl"
    load = ["--load", str(original["resume_dir"])]
    result = launch(
        world_size, _args(corpus, config, log, [*flags, *load, *extra]), log_dir=tmp / name
    )
    return result, log


def test_layout_free_state_is_saved(original: dict[str, Any]) -> None:
    state_dir = original["resume_dir"] / str(SAVED_AT) / LAYOUT_FREE_DIR
    state = json.loads((state_dir / STATE_FILE).read_text())
    assert state["layout"] == {
        "tensor": 2,
        "pipeline": 2,
        "data": 2,
        "zero_stage": 1,
        "precision": "fp32",
    }
    assert (state["iteration"], state["consumed_samples"]) == (SAVED_AT, SAVED_AT * GLOBAL_BATCH)
    assert state["optimizer"]["step"] == SAVED_AT
    assert state["optimizer"]["state_keys"] == ["exp_avg", "exp_avg_sq"]
    # one file per rank: the data-parallel peers of a (TP, PP) coordinate share the writing
    assert len(list(state_dir.glob("tp*_pp*_dp*.safetensors"))) == ORIGINAL[0]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_resume_on_another_layout_continues_the_run(
    name: str, original: dict[str, Any], glm_corpus: Corpus
) -> None:
    world_size, flags, ds = TARGETS[name]
    result, log = _resume(original, glm_corpus, name, world_size, flags, ds)
    assert result.ok, result.describe()
    assert "saved at TP2 x PP2 x DP2, ZeRO 1, fp32" in result.outputs[0], result.outputs[0][-3000:]
    got, want = _records(log), original["records"]
    assert sorted(got) == list(range(SAVED_AT + 1, ITERS + 1))
    for step, record in got.items():
        expected = want[step]
        assert math.isclose(record["loss"], expected["loss"], rel_tol=LOSS_RTOL), (
            step,
            record["loss"],
            expected["loss"],
        )
        assert record["lr"] == pytest.approx(expected["lr"], rel=1e-12), step
        assert record["consumed_samples"] == expected["consumed_samples"], step
        assert record["skipped_steps"] == 0
        assert math.isclose(record["grad_norm"], expected["grad_norm"], rel_tol=NORM_RTOL), step


def test_resume_without_optimizer_state_diverges(
    original: dict[str, Any], glm_corpus: Corpus
) -> None:
    result, log = _resume(
        original, glm_corpus, "no_optim", 1, [], {"micro": 1, "gas": 4}, ["--no-load-optim"]
    )
    assert result.ok, result.describe()
    got, want = _records(log), original["records"]
    first = SAVED_AT + 1  # computed before any update: the weights alone
    assert math.isclose(got[first]["loss"], want[first]["loss"], rel_tol=LOSS_RTOL)
    for step in range(first + 1, ITERS + 1):  # measured: about 1e-4 relative apart
        assert not math.isclose(got[step]["loss"], want[step]["loss"], rel_tol=LOSS_RTOL), step


def test_changed_global_batch_is_refused(original: dict[str, Any], glm_corpus: Corpus) -> None:
    result, log = _resume(
        original, glm_corpus, "bigger_batch", 1, [], {"micro": 2, "gas": 4}, train_batch=8
    )
    assert result.returncodes != [0]
    message = "was trained with a global batch of 4 samples per iteration, this run uses 8"
    assert message in result.outputs[0], result.outputs[0][-3000:]
    assert not log.exists() or read_log(log) == []
