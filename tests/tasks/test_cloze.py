"""Cloze classification (megatron_glm/tasks/cloze.py, superglue.py): the patterns, bad input
reported with its file and line, candidate scores independent of batching and of the TP degree,
and a finetune of the tiny pretrained model through ``finetune_glm.py`` that learns a two-label
task in the BoolQ format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.parallel import gather_full_parameters
from megatron_glm.parallel.random import model_parallel_seed
from megatron_glm.tasks.cloze import ClozeCollator, ClozeSettings, ClozeTask, load_split
from megatron_glm.tasks.data import TaskDataError
from megatron_glm.tasks.superglue import BLANK, READERS, Shortenable
from tests.distributed.harness import run_distributed
from tests.tasks.conftest import MODEL_ARGS
from tests.tasks.synthetic import write_boolq
from tests.training.helpers import launch, write_ds_config

SEED = 1234
SAMPLES = {
    "boolq": {"passage": "Water boils at 100 C.", "question": "does water boil", "label": True},
    "cb": {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": "neutral"},
    "rte": {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": "not_entailment"},
    "copa": {
        "premise": "The man fell.",
        "choice1": "He slipped.",
        "choice2": "He sang.",
        "question": "cause",
        "label": 0,
    },
    "wic": {
        "word": "bank",
        "sentence1": "A river bank.",
        "sentence2": "A bank loan.",
        "label": False,
    },
    "generic": {
        "text": "The sky is [MASK] today.",
        "choices": ["blue", "green", "red"],
        "label": 2,
    },
}
GOLD = {"boolq": 1, "cb": 2, "rte": 1, "copa": 0, "wic": 0, "generic": 2}


def _settings(task: str, data_dir: Path | str = ".", **kw: Any) -> ClozeSettings:
    values = {"pattern_id": 0, "multi_token": True, "seq_length": 48} | kw
    return ClozeSettings(task=task, data_dir=str(data_dir), **values)


@pytest.mark.parametrize("task", sorted(READERS))
def test_every_pattern_has_one_blank_and_a_candidate_per_label(task: str) -> None:
    reader = READERS[task]
    for pattern_id in reader.pattern_ids:
        filled = reader.fill(SAMPLES[task], pattern_id)
        assert sum(part is BLANK for part in filled.parts) == 1, (task, pattern_id)
        assert filled.label == GOLD[task]
        assert len(filled.candidates) == (len(reader.labels) or 3)
        assert any(isinstance(part, Shortenable) for part in filled.parts)


def test_patterns_follow_the_paper() -> None:
    """Spot checks of the official texts: BoolQ's verbalizers by pattern, RTE's stripped
    hypothesis, COPA's joiner and lower-cased choices, WiC's pattern 2 verbalizers."""
    boolq = READERS["boolq"]
    assert boolq.fill(SAMPLES["boolq"], 0).candidates == [" No", " Yes"]
    assert boolq.fill(SAMPLES["boolq"], 1).candidates == [" false", " true"]
    rte = READERS["rte"].fill(SAMPLES["rte"], 1)
    assert rte.parts[0] == Shortenable("An animal sat") and rte.candidates == [" Yes", " No"]
    copa = READERS["copa"].fill(SAMPLES["copa"], 0)
    assert " because" in copa.parts and copa.candidates == [" he slipped", " he sang"]
    assert READERS["cb"].fill(SAMPLES["cb"], 4).candidates == [" false", " true", " neither"]
    assert READERS["wic"].fill(SAMPLES["wic"], 2).candidates == ["2", "b"]


def _write(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def test_bad_input_is_reported_with_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    good = SAMPLES["generic"]
    train = _write(
        tmp_path / "train.jsonl",
        [
            good,
            {"text": "no blank here", "choices": ["a"], "label": 0},
            {"text": "x [MASK]", "choices": [], "label": 0},
            {"text": "x [MASK]", "choices": ["a", "b"], "label": 2},
            {"choices": ["a", "b"], "label": 0},
            "{not json",
        ],
    )
    with pytest.raises(TaskDataError) as err:
        load_split(_settings("generic", tmp_path), tokenizer, "train")
    problems = err.value.problems
    assert len(problems) == 5, problems
    assert problems[0].startswith(f"{train}:2: ") and "exactly one [MASK]" in problems[0]
    assert problems[1].startswith(f"{train}:3: ") and "choices is empty" in problems[1]
    assert problems[2].startswith(f"{train}:4: ") and "out of range" in problems[2]
    assert problems[3] == f"{train}:5: missing field 'text'"
    assert problems[4].startswith(f"{train}:6: not valid JSON")

    boolq = _write(tmp_path / "boolq" / "train.jsonl", [SAMPLES["boolq"]] * 3)
    with pytest.raises(TaskDataError) as err:
        load_split(_settings("boolq", boolq.parent, multi_token=False), tokenizer, "train")
    # a verbalizer that is not one token: once, with the count of the other lines
    (message,) = err.value.problems
    assert message.startswith(f"{boolq}:1: ") and "--multi-token" in message
    assert message.endswith("(and 2 more lines)")


def test_truncation_is_counted_and_located(tmp_path: Path, tokenizer: Any) -> None:
    long_passage = " ".join(["module function"] * 30)
    train = _write(
        tmp_path / "train.jsonl",
        [SAMPLES["boolq"], SAMPLES["boolq"] | {"passage": long_passage}],
    )
    settings = _settings("boolq", tmp_path, seq_length=64)
    examples, truncations = load_split(settings, tokenizer, "train")
    assert truncations.count == 1 and truncations.places[0].startswith(f"{train}:2 ")
    assert "1 of 2 examples truncated" in truncations.report(len(examples))
    assert all(len(e.part_a) + max(map(len, e.answers)) <= 64 for e in examples)


def _examples(tokenizer: Any, tmp_path: Path) -> list[Any]:
    """Generic examples of different lengths and numbers of candidates (multi-token)."""
    lines = [
        {"text": "a [MASK] b", "choices": ["module", "function object"], "label": 1},
        {"text": "the data of [MASK] in each file", "choices": ["x", "y", "zz"], "label": 0},
        {"text": "[MASK] list", "choices": ["set new use"], "label": 0},
    ]
    _write(tmp_path / "train.jsonl", lines)
    return load_split(_settings("generic", tmp_path), tokenizer, "train")[0]


def _model_config() -> GLMConfig:
    return GLMConfig.from_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, seed=SEED)


def test_padded_batch_scores_equal_one_by_one(tmp_path: Path, tokenizer: Any) -> None:
    examples = _examples(tokenizer, tmp_path)
    task = ClozeTask(_settings("generic", tmp_path), tokenizer, SEED, None)
    model = GLMModel(_model_config()).eval()

    def scores(batch: list[Any], length: int) -> torch.Tensor:
        collate = ClozeCollator(tokenizer, 3, length)
        mb = collate([{"example": e, "weight": 1.0} for e in batch])
        with torch.no_grad():
            logits = model(mb["tokens"], mb["position_ids"], mb["sep"])
        return task.scores(logits, task.targets(mb), None)

    together = scores(examples, 48)  # [3, 3]
    assert together.shape == (3, 3) and torch.isinf(together[2, 1:]).all()
    for i, example in enumerate(examples):
        unpadded = len(example.part_a) + max(map(len, example.answers))
        alone = scores([example], unpadded)
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)


def _tp_rank(rank: int, world_size: int, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    group = dist.new_group(list(range(world_size)))
    model_parallel_seed(SEED, rank)
    model = GLMModel(_model_config(), group if world_size > 1 else None)
    task = ClozeTask(_settings("generic"), None, SEED, None)
    targets = task.targets(batch)
    logits = model(batch["tokens"], batch["position_ids"], batch["sep"])
    tp = group if world_size > 1 else None
    scores = task.scores(logits, targets, tp)
    loss = task.loss(logits, targets, tp, torch.tensor(float(len(batch["labels"]))))
    loss.backward()
    return {
        "scores": scores.detach(),
        "loss": loss.detach(),
        "stats": task.eval_stats(logits.detach(), targets, tp),
        "grads": gather_full_parameters(model, tp, grads=True),
    }


def test_tp2_equals_tp1(tmp_path: Path, tokenizer: Any) -> None:
    examples = _examples(tokenizer, tmp_path)
    batch = ClozeCollator(tokenizer, 3, 32)([{"example": e, "weight": 1.0} for e in examples])
    (one,) = run_distributed(_tp_rank, 1, batch)
    two = run_distributed(_tp_rank, 2, batch)
    for rank in two:
        torch.testing.assert_close(rank["scores"], one["scores"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["loss"], one["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["stats"], one["stats"], rtol=1e-5, atol=1e-6)
        for name, grad in one["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6)


def test_finetune_learns_a_boolq_task(tmp_path: Path, pretrained: Path, glm_corpus: Any) -> None:
    """finetune_glm.py from the pretrained checkpoint: >= 90% on held-out examples."""
    data = write_boolq(tmp_path / "BoolQ", num_train=400, num_valid=100)
    ds = write_ds_config(tmp_path / "ds.json", train_batch=16, micro=16, lr=4e-3)
    save = tmp_path / "run"
    args = [
        *MODEL_ARGS,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(glm_corpus.tokenizer_model),
        "--task",
        "BoolQ",
        "--data-dir",
        str(data),
        "--load-pretrained",
        str(pretrained),
        "--pattern-id",
        "0",
        "--cloze-eval",
        "--multi-token",
        "--seq-length",
        "56",
        "--epochs",
        "6",
        "--warmup",
        "0.05",
        "--eval-interval",
        "75",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--num-workers",
        "0",
        "--no-progress-bar",
        "--deepspeed_config",
        str(ds),
        "--save",
        str(save),
    ]
    result = launch(1, args, log_dir=tmp_path, script="finetune_glm.py")
    assert result.ok, result.describe()
    results = json.loads((save / "results.json").read_text())
    assert results["task"] == "boolq" and results["split"] == "valid"
    assert results["metrics"]["examples"] == 100
    assert results["metrics"]["accuracy"] >= 0.9, results
    assert results["iteration"] == 150  # 6 epochs of 400 examples, 16 per iteration
    best = json.loads((save / "best" / "best.json").read_text())
    assert best["metric"] == "accuracy" and best["iteration"] in (75, 150)
    assert (save / "best" / str(best["iteration"]) / "COMPLETE").is_file()
