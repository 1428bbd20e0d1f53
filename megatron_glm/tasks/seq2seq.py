"""Sequence to sequence finetuning: source in Part A with a ``[gMASK]`` (or ``[sMASK]``), target
in Part B; evaluation by generation with ROUGE-1/2/L.

Shape legend: b micro-batch, s sequence (``src_seq_length + tgt_seq_length``), T target
positions of the micro-batch, v/w this rank's vocab shard.

Files in ``--data-dir``: ``train.jsonl`` / ``val.jsonl`` of ``{"source": ..., "target": ...}``,
or the line files ``train.source`` + ``train.target`` / ``val.source`` + ``val.target`` of the
official summarisation tasks (line i of one is the pair of line i of the other). Part A is
``[CLS] source [gMASK]`` (``[sMASK]`` then ``[eos]`` with ``--task-mask-type smask``), at most
``--src-seq-length`` tokens; Part B is ``[sop] target`` predicting ``target [eop]``, at most
``--tgt-seq-length`` tokens. Longer sources and targets are cut from their end; every cut is
counted and reported with its file and line.

The loss is the mean token cross entropy over the global batch's target tokens, with label
smoothing ``eps``: ``(1 - eps) * ce + eps * mean over the vocabulary of -log p`` (the official
definition; the mean runs over the padded vocabulary the model outputs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_glm.parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron_glm.tasks.base import MicroBatch, Task, TaskData
from megatron_glm.tasks.data import (
    EpochDataset,
    EvalDataset,
    Record,
    TaskDataError,
    Truncations,
    glm_row,
    read_jsonl,
    require,
    stack_rows,
)

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "valid": "val"}
BLANKS = ("gmask", "smask")


@dataclass(frozen=True)
class Seq2SeqExample:
    where: str
    part_a: tuple[int, ...]
    mask_index: int
    target: tuple[int, ...]  # target ids + [eop]
    target_text: str


@dataclass(frozen=True)
class Seq2SeqSettings:
    data_dir: str
    src_seq_length: int
    tgt_seq_length: int
    label_smoothing: float = 0.0
    blank: str = "gmask"
    # generation for the ROUGE evaluation (1 beam: greedy)
    num_beams: int = 1
    length_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_tgt_length: int = 0


def read_pairs(data_dir: str, split: str, problems: list[str]) -> list[tuple[str, str, str]]:
    """``(where, source, target)`` of a split, from its jsonl or its two line files."""
    name = SPLIT_NAMES[split]
    jsonl = Path(data_dir) / f"{name}.jsonl"
    source, target = Path(data_dir) / f"{name}.source", Path(data_dir) / f"{name}.target"
    if jsonl.is_file():
        pairs = []
        for record in read_jsonl(jsonl, problems):
            pair = _pair(record, problems)
            if pair is not None:
                pairs.append(pair)
        return pairs
    if source.is_file() and target.is_file():
        sources = source.read_text(encoding="utf-8").splitlines()
        targets = target.read_text(encoding="utf-8").splitlines()
        if len(sources) != len(targets):
            problems.append(
                f"{source} has {len(sources)} lines but {target} has {len(targets)}: line i of "
                "one must pair with line i of the other"
            )
            return []
        if not sources:
            problems.append(f"{source}: holds no examples")
        return [(f"{source}:{i + 1}", s, t) for i, (s, t) in enumerate(zip(sources, targets))]
    problems.append(
        f"{data_dir}: no {jsonl.name}, nor {source.name} with {target.name} (the {split} split)"
    )
    return []


def _pair(record: Record, problems: list[str]) -> tuple[str, str, str] | None:
    if not require(record, {"source": str, "target": str}, problems):
        return None
    return record.where, record.obj["source"], record.obj["target"]


def encode_pair(
    where: str,
    source: str,
    target: str,
    tokenizer: Any,
    settings: Seq2SeqSettings,
    truncations: Truncations,
) -> Seq2SeqExample:
    """Part A and the target of one pair, cut to the limits (counted in ``truncations``)."""
    if not target.strip():
        raise ValueError("target is empty")
    blank = tokenizer.gmask_id if settings.blank == "gmask" else tokenizer.smask_id
    # [CLS] source [gMASK], or [CLS] source [sMASK] [eos]
    frame = 2 if settings.blank == "gmask" else 3
    source_ids = tokenizer.encode(source)
    target_ids = tokenizer.encode(target) + [tokenizer.eop_id]
    removed = max(0, len(source_ids) + frame - settings.src_seq_length)
    removed += max(0, len(target_ids) - settings.tgt_seq_length)
    if removed:
        truncations.add(where, removed)
    source_ids = source_ids[: settings.src_seq_length - frame]
    target_ids = target_ids[: settings.tgt_seq_length]
    part_a = [tokenizer.cls_id, *source_ids, blank]
    if settings.blank == "smask":
        part_a.append(tokenizer.eos_id)
    return Seq2SeqExample(where, tuple(part_a), len(source_ids) + 1, tuple(target_ids), target)


def load_split(
    settings: Seq2SeqSettings, tokenizer: Any, split: str
) -> tuple[list[Seq2SeqExample], Truncations]:
    problems: list[str] = []
    pairs = read_pairs(settings.data_dir, split, problems)
    truncations = Truncations(split)
    examples = []
    for where, source, target in pairs:
        try:
            examples.append(encode_pair(where, source, target, tokenizer, settings, truncations))
        except ValueError as err:
            problems.append(f"{where}: {err}")
    if problems:
        raise TaskDataError(problems)
    return examples, truncations


def smoothed_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    label_smoothing: float,
) -> torch.Tensor:
    """Per-token ``(1 - eps) * ce + eps * mean_v(-log p_v)`` of vocab-parallel ``logits [T,
    v/w]`` (fp32 ``[T]``); ``eps = 0`` is the plain cross entropy."""
    ce = vocab_parallel_cross_entropy(logits, labels, tp_group)
    if not label_smoothing:
        return ce
    z = logits.float()
    # -mean_v log p_v = logsumexp(z) - mean_v(z); both sums run over every vocab shard
    shift = z.detach().max(-1, keepdim=True).values
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = reduce_from_tensor_model_parallel_region((z - shift).exp().sum(-1), tp_group)
    sum_z = reduce_from_tensor_model_parallel_region(z.sum(-1), tp_group)
    vocab = z.shape[-1] * (1 if tp_group is None else dist.get_world_size(tp_group))
    smooth = sum_exp.log() + shift.squeeze(-1) - sum_z / vocab
    return (1 - label_smoothing) * ce + label_smoothing * smooth


class Seq2SeqTask(Task):
    """``--task seq2seq`` (and the official summarisation names)."""

    name = "seq2seq"
    best_metric = "loss"
    higher_is_better = False

    def __init__(
        self,
        settings: Seq2SeqSettings,
        tokenizer: Any,
        seed: int,
        eval_micro_batch_size: int | None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.seed = seed
        self.input_length = settings.src_seq_length + settings.tgt_seq_length
        self.eval_micro_batch_size = eval_micro_batch_size
        self.truncations: list[Truncations] = []

    @property
    def generation(self) -> Any:
        """How the ROUGE evaluation fills the blank: up to the Part B budget, greedy or beams."""
        from megatron_glm.inference import GenerationConfig

        s = self.settings
        return GenerationConfig(
            out_seq_length=s.tgt_seq_length - 1,  # Part B holds [sop] and the text
            temperature=0.0,
            num_beams=s.num_beams,
            length_penalty=s.length_penalty,
            no_repeat_ngram_size=s.no_repeat_ngram_size,
            min_tgt_length=min(s.min_tgt_length, s.tgt_seq_length - 1),
        )

    def load(self, split: str, report: bool = True) -> list[Seq2SeqExample]:
        examples, truncations = load_split(self.settings, self.tokenizer, split)
        message = truncations.report(len(examples))
        if message and report:
            logger.warning("%s", message)
        self.truncations.append(truncations)
        return examples

    def build_data(self, groups: Any) -> TaskData:
        train, valid = self.load("train"), self.load("valid")
        self.valid_examples = valid
        collator = Seq2SeqCollator(self.tokenizer, self.input_length)
        return TaskData(EpochDataset(train, self.seed), EvalDataset(valid), collator, len(valid))

    def loss_units(self, mb: MicroBatch) -> torch.Tensor:
        return mb["loss_mask"].double().sum()

    def targets(self, mb: MicroBatch) -> tuple[torch.Tensor, ...]:
        return mb["targets"], mb["loss_mask"]

    def _token_losses(
        self, logits: torch.Tensor, targets: Sequence[torch.Tensor], tp_group: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        labels, loss_mask = targets
        scored = loss_mask > 0  # [b, s]
        return smoothed_token_loss(
            logits[scored], labels[scored], tp_group, self.settings.label_smoothing
        ), loss_mask[scored].float()

    def loss(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
        normalizer: torch.Tensor,
    ) -> torch.Tensor:
        losses, weights = self._token_losses(logits, targets, tp_group)
        return (losses * weights).sum() / normalizer

    def eval_stats(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """``[loss sum, target tokens]`` (the loss without smoothing)."""
        labels, loss_mask = targets
        scored = loss_mask > 0
        ce = vocab_parallel_cross_entropy(logits[scored], labels[scored], tp_group)
        weights = loss_mask[scored].double()
        return torch.stack([(ce.double() * weights).sum(), weights.sum()]).cpu()

    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        return {"loss": float(stats[0]) / max(float(stats[1]), 1.0), "tokens": float(stats[1])}


class Seq2SeqCollator:
    def __init__(self, tokenizer: Any, input_length: int) -> None:
        self.sop, self.pad = tokenizer.sop_id, tokenizer.pad_id
        self.input_length = input_length

    def __call__(self, batch: list[dict[str, Any]]) -> MicroBatch:
        rows = [
            glm_row(e.part_a, e.mask_index, e.target, self.sop, self.pad)
            for e in (item["example"] for item in batch)
        ]
        out = stack_rows(rows, self.input_length, self.pad)
        # padding examples of the validation loader count for nothing
        out["loss_mask"] *= torch.tensor([float(item["weight"]) for item in batch])[:, None]
        return out
