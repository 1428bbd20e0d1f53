"""Cloze classification as GLM does SuperGLUE: every label is scored as a Part B span.

Shape legend: b examples of a micro-batch, C candidates per example, R = b * C rows, s sequence,
T scored (Part B) positions, v/w this rank's vocab shard.

An example becomes Part A ``[CLS] pattern-text-with-[MASK] [eos]``; each candidate (the label's
verbalizer) gets its own row whose Part B is ``[sop] + verbalizer[:-1]`` with targets
``verbalizer`` (plus ``[eop]`` with ``--multi-token``, as the official code scores it). A
candidate's score is the sum of the log-probabilities of its targets, divided by
``length ** length_penalty`` (0: the sum, 1: the mean); the loss is the cross entropy of the
scores against the gold candidate. Without ``--multi-token`` every verbalizer must be one token
and the score is that token's log-probability after ``[sop]``: the official single-token model's
logits at that position up to a constant per row, so the same softmax over the candidates.
Examples with fewer candidates than ``C`` (the generic format) get masked rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.parallel.cross_entropy import vocab_parallel_cross_entropy
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
    shorten,
    stack_rows,
)
from megatron_glm.tasks.superglue import BLANK, READERS, ClozeReader, Filled, Shortenable

logger = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train.jsonl", "valid": "val.jsonl"}


@dataclass(frozen=True)
class ClozeExample:
    where: str  # path:line
    part_a: tuple[int, ...]  # [CLS] text [eos], one blank
    mask_index: int
    answers: tuple[tuple[int, ...], ...]  # per candidate: its targets
    label: int


@dataclass(frozen=True)
class ClozeSettings:
    task: str
    data_dir: str
    pattern_id: int
    multi_token: bool
    seq_length: int
    length_penalty: float = 0.0


def encode_filled(
    filled: Filled,
    tokenizer: Any,
    settings: ClozeSettings,
    multi_token: bool,
    where: str,
    truncations: Truncations,
) -> ClozeExample:
    """Tokenize a filled pattern; ``ValueError`` when it cannot become a row."""
    if filled.label is None:
        raise ValueError("missing field 'label'")
    answers = []
    for text in filled.candidates:
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"candidate {text!r} encodes to no tokens")
        if not multi_token and len(ids) != 1:
            raise ValueError(
                f"candidate {text!r} is {len(ids)} tokens; pass --multi-token to score "
                "multi-token verbalizers"
            )
        answers.append(tuple(ids + [tokenizer.eop_id] if multi_token else ids))
    pieces = [
        [tokenizer.mask_id] if p is BLANK else tokenizer.encode(_text(p)) for p in filled.parts
    ]
    can_shorten = [isinstance(p, Shortenable) for p in filled.parts]
    # [CLS] + parts + [eos] + the longest Part B
    excess = 2 + sum(map(len, pieces)) + max(map(len, answers)) - settings.seq_length
    if excess > 0:
        removed = shorten(pieces, can_shorten, excess)
        if removed < excess:
            raise ValueError(
                f"does not fit --seq-length {settings.seq_length} even with its shortenable "
                f"text removed ({excess - removed} tokens too many)"
            )
        truncations.add(where, removed)
    part_a = [tokenizer.cls_id, *(t for piece in pieces for t in piece), tokenizer.eos_id]
    return ClozeExample(
        where, tuple(part_a), part_a.index(tokenizer.mask_id), tuple(answers), filled.label
    )


def _text(part: Any) -> str:
    return part.text if isinstance(part, Shortenable) else part


def load_split(
    settings: ClozeSettings, tokenizer: Any, split: str
) -> tuple[list[ClozeExample], Truncations]:
    """Read and encode ``<data_dir>/<split file>``; ``TaskDataError`` with every problem."""
    reader = READERS[settings.task]
    path = Path(settings.data_dir) / SPLIT_FILES[split]
    problems: list[str] = []
    if not path.is_file():
        raise TaskDataError([f"{path}: no such file (the {split} split of --task {reader.name})"])
    records = read_jsonl(path, problems)
    truncations = Truncations(split)
    examples = []
    multi_token = settings.multi_token or reader.multi_token
    for record in records:
        example = _encode_record(reader, record, tokenizer, settings, multi_token, truncations)
        if isinstance(example, str):
            problems.append(example)
        else:
            examples.append(example)
    if problems:
        raise TaskDataError(problems)
    return examples, truncations


def _encode_record(
    reader: ClozeReader,
    record: Record,
    tokenizer: Any,
    settings: ClozeSettings,
    multi_token: bool,
    truncations: Truncations,
) -> ClozeExample | str:
    """The example, or the problem (``path:line: ...``)."""
    missing: list[str] = []
    if not require(record, reader.fields, missing):
        return "; ".join(missing)
    try:
        filled = reader.fill(record.obj, settings.pattern_id)
        return encode_filled(filled, tokenizer, settings, multi_token, record.where, truncations)
    except (KeyError, TypeError, ValueError) as err:
        return f"{record.where}: {err}"


class ClozeTask(Task):
    """Cloze classification finetuning (``--task boolq|cb|copa|rte|wic|generic``)."""

    best_metric = "accuracy"

    def __init__(
        self, settings: ClozeSettings, tokenizer: Any, seed: int, eval_micro_batch_size: int | None
    ) -> None:
        self.settings = settings
        self.reader = READERS[settings.task]
        self.name = settings.task
        self.tokenizer = tokenizer
        self.seed = seed
        self.input_length = settings.seq_length
        self.eval_micro_batch_size = eval_micro_batch_size
        self.truncations: list[Truncations] = []

    def load(self, split: str, report: bool = True) -> list[ClozeExample]:
        examples, truncations = load_split(self.settings, self.tokenizer, split)
        message = truncations.report(len(examples))
        if message and report:
            logger.warning("%s", message)
        self.truncations.append(truncations)
        return examples

    def build_data(self, groups: Any) -> TaskData:
        train, valid = self.load("train"), self.load("valid")
        self.num_choices = max(len(e.answers) for e in [*train, *valid])
        collator = ClozeCollator(self.tokenizer, self.num_choices, self.input_length)
        return TaskData(EpochDataset(train, self.seed), EvalDataset(valid), collator, len(valid))

    def loss_units(self, mb: MicroBatch) -> torch.Tensor:
        return mb["weight"].double().sum()

    def targets(self, mb: MicroBatch) -> tuple[torch.Tensor, ...]:
        return mb["targets"], mb["loss_mask"], mb["labels"], mb["choice_mask"], mb["weight"]

    def scores(
        self, logits: torch.Tensor, targets: Sequence[torch.Tensor], tp_group: Any
    ) -> torch.Tensor:
        """Candidate scores ``[b, C]`` (-inf for masked candidates)."""
        target_ids, loss_mask, _, choice_mask, _ = targets
        return (
            candidate_scores(logits, target_ids, loss_mask, tp_group, self.settings.length_penalty)
            .view(choice_mask.shape)
            .masked_fill(~choice_mask, float("-inf"))
        )

    def loss(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
        normalizer: torch.Tensor,
    ) -> torch.Tensor:
        labels, weight = targets[2], targets[4]
        ce = F.cross_entropy(self.scores(logits, targets, tp_group), labels, reduction="none")
        return (ce * weight.float()).sum() / normalizer

    def eval_stats(
        self,
        logits: torch.Tensor,
        targets: Sequence[torch.Tensor],
        tp_group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """A confusion matrix ``[C, C]`` (gold, predicted), then the loss sum and the count."""
        labels, weight = targets[2], targets[4].double()
        scores = self.scores(logits, targets, tp_group)
        c = scores.shape[1]
        confusion = torch.zeros(c * c, dtype=torch.float64, device=scores.device)
        confusion.index_add_(0, labels * c + scores.argmax(-1), weight)
        ce = F.cross_entropy(scores, labels, reduction="none").double()
        loss = torch.stack([(ce * weight).sum(), weight.sum()])
        return torch.cat([confusion, loss]).cpu()

    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        return classification_metrics(stats, f1=self.reader.f1)


def classification_metrics(stats: torch.Tensor, *, f1: bool) -> dict[str, float]:
    """Accuracy (and macro F1) from ``ClozeTask.eval_stats`` summed."""
    c = int(round((stats.numel() - 2) ** 0.5))
    confusion = stats[: c * c].reshape(c, c)
    total = float(confusion.sum())
    out = {"accuracy": float(confusion.trace()) / max(total, 1.0)}
    if f1:
        tp = confusion.diagonal()
        fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
        per_class = 2 * tp / (2 * tp + fp + fn).clamp(min=1e-12)
        out["f1-macro"] = float(per_class.mean())
    out["loss"] = float(stats[-2]) / max(float(stats[-1]), 1.0)
    out["examples"] = total
    return out


def candidate_scores(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    length_penalty: float = 0.0,
) -> torch.Tensor:
    """Per row: the summed log-probability of its Part B targets ``[R]`` (fp32), from
    vocab-parallel ``logits [R, s, v/w]``; divided by ``length ** length_penalty``."""
    scored = loss_mask > 0  # [R, s]
    logp = -vocab_parallel_cross_entropy(logits[scored], target_ids[scored], tp_group)  # [T]
    rows = scored.nonzero()[:, 0]
    total = torch.zeros(scored.shape[0], dtype=logp.dtype, device=logp.device)
    total = total.index_add(0, rows, logp)
    if length_penalty:
        total = total / loss_mask.float().sum(-1).clamp(min=1.0) ** length_penalty
    return total


class ClozeCollator:
    """Examples -> ``[b * C, input_length]`` rows plus labels, candidate mask and weights."""

    def __init__(self, tokenizer: Any, num_choices: int, input_length: int) -> None:
        self.sop, self.pad = tokenizer.sop_id, tokenizer.pad_id
        self.num_choices = num_choices
        self.input_length = input_length

    def __call__(self, batch: list[dict[str, Any]]) -> MicroBatch:
        rows, choice_mask = [], []
        for item in batch:
            e: ClozeExample = item["example"]
            for c in range(self.num_choices):
                answer = e.answers[min(c, len(e.answers) - 1)]  # a masked copy past the end
                rows.append(glm_row(e.part_a, e.mask_index, answer, self.sop, self.pad))
            choice_mask.append([c < len(e.answers) for c in range(self.num_choices)])
        out = stack_rows(rows, self.input_length, self.pad)
        out["labels"] = torch.tensor([item["example"].label for item in batch])
        out["choice_mask"] = torch.tensor(choice_mask, dtype=torch.bool)
        out["weight"] = torch.tensor([float(item["weight"]) for item in batch])
        return out
