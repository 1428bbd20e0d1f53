"""``finetune_glm.py`` runs on the trainer's machinery: a stopped finetuning resumes bit for bit,
two pipeline stages (with another validation micro-batch size) train as one, and a bad task file
stops the command before any process group with every problem and its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tasks.conftest import MODEL_ARGS
from tests.tasks.synthetic import write_boolq
from tests.training.helpers import launch, read_log, write_ds_config

ITERS = 6


def _args(tmp_path: Path, glm_corpus: Any, pretrained: Path, log: Path, *extra: str) -> list[str]:
    data = write_boolq(tmp_path / "BoolQ", num_train=64, num_valid=24)
    ds = write_ds_config(tmp_path / "ds.json", train_batch=8, micro=4, lr=4e-3)
    return [
        *MODEL_ARGS,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(glm_corpus.tokenizer_model),
        "--task",
        "boolq",
        "--data-dir",
        str(data),
        "--load-pretrained",
        str(pretrained),
        "--multi-token",
        "--seq-length",
        "56",
        "--train-iters",
        str(ITERS),
        "--log-interval",
        "1",
        "--log-json",
        str(log),
        "--num-workers",
        "0",
        "--no-progress-bar",
        "--deepspeed_config",
        str(ds),
        *extra,
    ]


def _run(world_size: int, args: list[str], tmp_path: Path) -> None:
    result = launch(world_size, args, log_dir=tmp_path, script="finetune_glm.py")
    assert result.ok, result.describe()


def test_finetuning_resumes_exactly(tmp_path: Path, glm_corpus: Any, pretrained: Path) -> None:
    straight = tmp_path / "straight.jsonl"
    _run(1, _args(tmp_path, glm_corpus, pretrained, straight), tmp_path)
    save, stopped = tmp_path / "ckpt", tmp_path / "stopped.jsonl"
    resumable = _args(
        tmp_path, glm_corpus, pretrained, stopped, "--save", str(save), "--load", str(save)
    )
    _run(1, [*resumable, "--exit-interval", "3"], tmp_path)
    assert [r["step"] for r in read_log(stopped)] == [1, 2, 3]
    _run(1, resumable, tmp_path)  # the same command again: resumes at 3
    assert [(r["step"], r["loss"]) for r in read_log(stopped)] == [
        (r["step"], r["loss"]) for r in read_log(straight)
    ]
    assert json.loads((save / "results.json").read_text())["iteration"] == ITERS


def test_two_pipeline_stages_train_as_one(
    tmp_path: Path, glm_corpus: Any, pretrained: Path
) -> None:
    one, two = tmp_path / "pp1.jsonl", tmp_path / "pp2.jsonl"
    common = ["--eval-interval", "3", "--eval-batch-size", "6"]
    common += ["--hidden-dropout", "0", "--attention-dropout", "0"]
    _run(
        1,
        _args(tmp_path, glm_corpus, pretrained, one, *common, "--save", str(tmp_path / "a")),
        tmp_path,
    )
    _run(
        2,
        _args(
            tmp_path, glm_corpus, pretrained, two, *common,
            "--pipeline-model-parallel-size", "2", "--save", str(tmp_path / "b"),
        ),
        tmp_path,
    )  # fmt: skip
    for a, b in zip(read_log(one), read_log(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    evals = [
        [
            r["metrics"]
            for r in map(json.loads, path.read_text().splitlines())
            if r["kind"] == "valid"
        ]
        for path in (one, two)
    ]
    assert len(evals[0]) == 2
    for a, b in zip(*evals, strict=True):
        assert b["examples"] == a["examples"] == 24
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in "ab"]
    assert results[0]["metrics"]["accuracy"] == results[1]["metrics"]["accuracy"]


def test_bad_task_data_stops_before_training(
    tmp_path: Path, glm_corpus: Any, pretrained: Path
) -> None:
    args = _args(tmp_path, glm_corpus, pretrained, tmp_path / "log.jsonl")
    val = tmp_path / "BoolQ" / "val.jsonl"
    lines = val.read_text().splitlines()
    lines[3] = json.dumps({"passage": "x", "label": True})
    lines[7] = json.dumps({"passage": "x", "question": "y", "label": "maybe"})
    val.write_text("\n".join(lines) + "\n")
    result = launch(1, [*args, "--pattern-id", "9"], log_dir=tmp_path, script="finetune_glm.py")
    assert result.returncodes == [2]
    assert "--pattern-id 9: --task boolq has patterns (0, 1, 2, 3, 4, 5)" in result.outputs[0]
    result = launch(1, args, log_dir=tmp_path, script="finetune_glm.py")
    assert result.returncodes == [2]
    assert f"{val}:4: missing field 'question'" in result.outputs[0]
    assert f"{val}:8: label 'maybe' is not one of [False, True]" in result.outputs[0]
