"""``finetune_glm.py``'s flags, task registry, run and ``results.json`` (docs/finetuning.md).

``add_finetune_args`` adds the official finetuning flags to the pretraining parser;
``FinetuneConfig`` holds them, validated; ``check_task_data`` reads and checks the task's files
before any process group exists (every bad line reported with its file and line) and counts the
training examples, from which ``--epochs`` becomes iterations. ``finetune(run)`` trains the task
on the shared loop, evaluates the final model and writes ``<save>/results.json``::

    {"task": "boolq", "split": "valid", "metrics": {"accuracy": ...}, "iteration": ...,
     "truncated": {"train": 0, "valid": 0}, "best": {"iteration": ..., "value": ...}}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_glm.tasks.base import Task
from megatron_glm.tasks.superglue import READERS

logger = logging.getLogger(__name__)

# The official summarisation task names read the same files as ``seq2seq``.
SEQ2SEQ_TASKS = ("seq2seq", "cnn_dm", "cnn_dm_original", "xsum", "gigaword")
TASK_NAMES = (*READERS, *SEQ2SEQ_TASKS)
RESULTS_FILE = "results.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """The task flags of ``finetune_glm.py`` (names as the official ``finetune_glm.py``)."""

    task: str
    data_dir: str
    epochs: int | None = None
    pattern_id: int = 0
    multi_token: bool = False
    length_penalty: float = 0.0
    src_seq_length: int = 464
    tgt_seq_length: int = 48
    eval_batch_size: int | None = None
    label_smoothing: float = 0.0
    task_mask_type: str = "gmask"
    seq_length: int = 512  # cloze rows (the official --seq-length / max_seq_length)
    generation_eval: bool = True  # seq2seq: ROUGE by generation at the end
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    min_tgt_length: int = 0

    @property
    def is_seq2seq(self) -> bool:
        return self.task in SEQ2SEQ_TASKS

    @property
    def input_length(self) -> int:
        return self.src_seq_length + self.tgt_seq_length if self.is_seq2seq else self.seq_length

    def problems(self) -> list[str]:
        out = []
        if self.task not in TASK_NAMES:
            out.append(f"--task {self.task!r} is not one of {', '.join(TASK_NAMES)}")
        elif not self.is_seq2seq and self.pattern_id not in READERS[self.task].pattern_ids:
            ids = READERS[self.task].pattern_ids
            out.append(f"--pattern-id {self.pattern_id}: --task {self.task} has patterns {ids}")
        if not Path(self.data_dir).is_dir():
            out.append(f"--data-dir {self.data_dir} is not a directory")
        if self.epochs is not None and self.epochs < 1:
            out.append(f"--epochs must be >= 1, got {self.epochs}")
        if self.num_beams < 1:
            out.append(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            out.append(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            out.append(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.length_penalty < 0:
            out.append(f"--length-penalty must be >= 0, got {self.length_penalty}")
        for flag, value in (("src", self.src_seq_length), ("tgt", self.tgt_seq_length)):
            if self.is_seq2seq and value < 4:
                out.append(f"--{flag}-seq-length must be >= 4, got {value}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("finetuning (docs/finetuning.md)")
    g.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)}")
    g.add_argument("--data-dir", required=True, help="the task's files (docs/finetuning.md)")
    g.add_argument(
        "--epochs", type=int, default=None, help="passes over the training set (or --train-iters)"
    )
    g.add_argument("--pattern-id", type=int, default=0, help="cloze pattern (docs/finetuning.md)")
    g.add_argument(
        "--cloze-eval",
        action="store_true",
        help="score labels as cloze spans (always so here: no classification head)",
    )
    g.add_argument(
        "--multi-token",
        action="store_true",
        help="score every verbalizer token (+[eop]) of each candidate, not one token",
    )
    g.add_argument(
        "--length-penalty",
        type=float,
        default=0.0,
        help="cloze: a candidate's summed log-probability / length**this (1 = the mean)",
    )
    g.add_argument("--src-seq-length", type=int, default=464, help="seq2seq Part A tokens")
    g.add_argument("--tgt-seq-length", type=int, default=48, help="seq2seq Part B tokens")
    g.add_argument("--eval-batch-size", type=int, default=None, help="validation micro-batch size")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="seq2seq loss smoothing")
    g.add_argument(
        "--task-mask-type",
        choices=("gmask", "smask"),
        default="gmask",
        help="seq2seq: the blank after the source",
    )
    g.add_argument("--num-beams", type=int, default=1, help="seq2seq ROUGE: beam search width")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="seq2seq ROUGE generation")
    g.add_argument("--min-tgt-length", type=int, default=0, help="seq2seq ROUGE generation")
    g.add_argument(
        "--no-generation-eval",
        action="store_true",
        help="seq2seq: skip the final ROUGE evaluation by generation",
    )


def finetune_config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        task=args.task.lower(),
        data_dir=args.data_dir,
        epochs=args.epochs,
        pattern_id=args.pattern_id,
        multi_token=args.multi_token,
        length_penalty=args.length_penalty,
        src_seq_length=args.src_seq_length,
        tgt_seq_length=args.tgt_seq_length,
        eval_batch_size=args.eval_batch_size,
        label_smoothing=args.label_smoothing,
        task_mask_type=args.task_mask_type,
        seq_length=args.seq_length,
        generation_eval=not args.no_generation_eval,
        num_beams=args.num_beams,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_tgt_length=args.min_tgt_length,
    )


def build_task(config: FinetuneConfig, tokenizer: Any, seed: int) -> Task:
    if config.is_seq2seq:
        from megatron_glm.tasks.seq2seq import Seq2SeqSettings, Seq2SeqTask

        settings = Seq2SeqSettings(
            config.data_dir,
            config.src_seq_length,
            config.tgt_seq_length,
            config.label_smoothing,
            config.task_mask_type,
            config.num_beams,
            config.length_penalty,
            config.no_repeat_ngram_size,
            config.min_tgt_length,
        )
        return Seq2SeqTask(settings, tokenizer, seed, config.eval_batch_size)
    from megatron_glm.tasks.cloze import ClozeSettings, ClozeTask

    settings = ClozeSettings(
        config.task,
        config.data_dir,
        config.pattern_id,
        config.multi_token,
        config.seq_length,
        config.length_penalty,
    )
    return ClozeTask(settings, tokenizer, seed, config.eval_batch_size)


def check_task_data(config: FinetuneConfig, tokenizer: Any) -> tuple[int, list[str]]:
    """The number of training examples and every problem of the task's files."""
    from megatron_glm.tasks.data import TaskDataError

    task = build_task(config, tokenizer, seed=0)
    problems: list[str] = []
    num_train = 0
    for split in ("train", "valid"):
        try:
            examples = task.load(split, report=False)  # type: ignore[attr-defined]
        except TaskDataError as err:
            problems.extend(err.problems)
            continue
        if split == "train":
            num_train = len(examples)
    return num_train, problems


def iterations_for_epochs(epochs: int, num_train: int, global_batch: int) -> int:
    return max(1, math.ceil(epochs * num_train / global_batch))


def write_results(
    save: str, task: str, split: str, metrics: dict[str, float], **extra: Any
) -> Path:
    """``<save>/results.json``: ``{"task", "split", "metrics"}`` and ``extra``."""
    from megatron_glm.atomic_files import atomic_write_text

    path = Path(save) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": task, "split": split, "metrics": metrics, **extra}
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def finetune(run: Any, hooks: Any = None) -> dict[str, Any]:
    """Train ``run.task`` and evaluate the final model; every rank calls it and gets the
    results (rank 0 writes ``results.json`` to ``--save``)."""
    from megatron_glm.data.tokenizers import tokenizer_from_spec
    from megatron_glm.training.loop import evaluate_split, train

    config: FinetuneConfig = run.task
    tokenizer = tokenizer_from_spec(run.data.tokenizer_spec)
    task = build_task(config, tokenizer, run.data.seed)
    if dist.get_rank() == 0:
        logger.info(
            "finetuning %s for %d iterations of %d examples: %s",
            task.name,
            run.training.train_iters,
            run.ds.train_batch_size,
            config,
        )
    result = train(run, task, hooks)
    metrics = task.metrics(evaluate_split(run, result.groups, result.trainer, task, result.data))
    if config.is_seq2seq and config.generation_eval:
        from megatron_glm.tasks.generation_eval import rouge_by_generation

        metrics |= rouge_by_generation(task, result.trainer, result.groups)
    truncated = {t.split: t.count for t in task.truncations}  # type: ignore[attr-defined]
    results = {
        "task": task.name,
        "split": "valid",
        "metrics": metrics,
        "iteration": result.iteration,
        "truncated": truncated,
        "best": result.best,
    }
    if dist.get_rank() == 0:
        logger.info("final evaluation: %s", metrics)
        if run.training.save:
            path = write_results(run.training.save, **results)
            logger.info("results written to %s", path)
    return results
