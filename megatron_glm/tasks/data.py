"""Finetuning data: reading task files with ``file:line`` messages, GLM rows, datasets by index.

Shape legend: R rows of a micro-batch, L the task's input length.

Every problem of a task file is collected and raised at once as ``TaskDataError``, each line
starting with ``path:line``. Nothing is cut silently: a ``Truncations`` counter records every
example that had to be shortened to fit (with the first few places), the run logs it and the
results JSON carries the count.

A GLM row (docs/finetuning.md#rows) is Part A, the text with one blank token (``[MASK]``,
``[sMASK]`` or ``[gMASK]``), then Part B, ``[sop]`` followed by the answer: Part A tokens have
positions ``0..sep-1`` and block position 0, Part B tokens all take the blank's position and block
positions ``1, 2, ...``; the targets of Part B are the answer tokens, shifted by one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_SHOWN_PLACES = 5


class TaskDataError(ValueError):
    """Every problem found in a task's data files, one ``path:line: message`` per line, in file
    order; a message repeated on many lines (a verbalizer that does not fit) is shown once, with
    the number of other lines that have it."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = _collapse(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the task data:\n  - " + "\n  - ".join(problems)
        )


def _file_order(problem: str) -> tuple[str, int]:
    where = problem.partition(": ")[0]
    path, _, line = where.rpartition(":")
    return (path, int(line)) if line.isdigit() else (where, 0)


def _collapse(problems: Sequence[str]) -> list[str]:
    """In file order; a message repeated on several lines once, with the count of the others."""
    first: dict[str, int] = {}
    repeats: dict[str, int] = {}
    out: list[str] = []
    for problem in sorted(problems, key=_file_order):
        where, sep, message = problem.partition(": ")
        key = message if sep and ":" in where else problem
        if key in first:
            repeats[key] = repeats.get(key, 0) + 1
            continue
        first[key] = len(out)
        out.append(problem)
    for key, count in repeats.items():
        out[first[key]] += f" (and {count} more line{'s' if count > 1 else ''})"
    return out


@dataclass(frozen=True)
class Record:
    """One JSON object of a jsonl file and where it came from."""

    path: str
    line: int
    obj: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_jsonl(path: str | Path, problems: list[str]) -> list[Record]:
    """The objects of a jsonl file (blank lines skipped); bad lines go to ``problems``."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                problems.append(f"{path}:{number}: not valid JSON ({err})")
                continue
            if not isinstance(obj, dict):
                problems.append(
                    f"{path}:{number}: expected a JSON object, got {type(obj).__name__}"
                )
                continue
            records.append(Record(str(path), number, obj))
    if not records and not any(p.startswith(f"{path}:") for p in problems):
        problems.append(f"{path}: holds no examples")
    return records


def require(
    record: Record, fields: dict[str, type | tuple[type, ...]], problems: list[str]
) -> bool:
    """Check that ``record`` has each field with the given type; False (and problems) if not."""
    ok = True
    for name, kind in fields.items():
        if name not in record.obj:
            problems.append(f"{record.where}: missing field {name!r}")
            ok = False
        elif not isinstance(record.obj[name], kind) or isinstance(record.obj[name], bool) != (
            kind is bool
        ):
            got = type(record.obj[name]).__name__
            problems.append(f"{record.where}: field {name!r} must be {_kind_name(kind)}, got {got}")
            ok = False
    return ok


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@dataclass
class Truncations:
    """How many examples of a split were shortened, and where the first few are."""

    split: str
    count: int = 0
    places: list[str] = field(default_factory=list)

    def add(self, where: str, removed: int) -> None:
        self.count += 1
        if len(self.places) < _SHOWN_PLACES:
            self.places.append(f"{where} ({removed} tokens)")

    def report(self, total: int) -> str | None:
        if not self.count:
            return None
        more = "" if self.count <= len(self.places) else ", ..."
        return (
            f"{self.split}: {self.count} of {total} examples truncated to fit: "
            f"{', '.join(self.places)}{more}"
        )


@dataclass(frozen=True)
class Row:
    """One GLM row before padding (numpy, unpadded)."""

    tokens: np.ndarray  # [t]
    position_ids: np.ndarray  # [2, t]
    sep: int
    targets: np.ndarray  # [t] the next token at Part B positions, pad elsewhere
    loss_mask: np.ndarray  # [t] 1 on Part B


def glm_row(
    part_a: Sequence[int], mask_index: int, answer: Sequence[int], sop: int, pad: int
) -> Row:
    """Part A (``part_a``, its blank at ``mask_index``) and Part B ``[sop] + answer[:-1]`` with
    targets ``answer``; an empty answer gives Part A alone (nothing to predict)."""
    sep = len(part_a)
    tokens = list(part_a) + ([sop, *answer[:-1]] if answer else [])
    t = len(tokens)
    positions = np.zeros((2, t), np.int64)
    positions[0, :sep] = np.arange(sep)
    positions[0, sep:] = mask_index
    positions[1, sep:] = np.arange(1, t - sep + 1)
    targets = np.full(t, pad, np.int64)
    targets[sep:] = answer
    loss_mask = np.zeros(t, np.float32)
    loss_mask[sep:] = 1.0
    return Row(np.asarray(tokens, np.int64), positions, sep, targets, loss_mask)


def stack_rows(rows: Sequence[Row], length: int, pad: int) -> dict[str, torch.Tensor]:
    """Pad rows to ``[R, length]``: pad tokens and targets, loss 0, positions 0."""
    r = len(rows)
    tokens = np.full((r, length), pad, np.int64)
    targets = np.full((r, length), pad, np.int64)
    loss_mask = np.zeros((r, length), np.float32)
    positions = np.zeros((r, 2, length), np.int64)
    for i, row in enumerate(rows):
        t = row.tokens.size
        assert t <= length, (t, length)
        tokens[i, :t], targets[i, :t], loss_mask[i, :t] = row.tokens, row.targets, row.loss_mask
        positions[i, :, :t] = row.position_ids
    return {
        "tokens": torch.from_numpy(tokens),
        "position_ids": torch.from_numpy(positions),
        "sep": torch.tensor([row.sep for row in rows], dtype=torch.int64),
        "targets": torch.from_numpy(targets),
        "loss_mask": torch.from_numpy(loss_mask),
    }


def shorten(parts: list[list[int]], shortenable: Sequence[bool], excess: int) -> int:
    """Remove ``excess`` tokens, one at a time from the end of the longest shortenable part (in
    place); returns how many could be removed."""
    removed = 0
    for _ in range(excess):
        candidates = [i for i, ok in enumerate(shortenable) if ok and parts[i]]
        if not candidates:
            break
        longest = max(candidates, key=lambda i: len(parts[i]))
        parts[longest].pop()
        removed += 1
    return removed


class EpochDataset:
    """The training order of a finetuning set: sample ``i`` is example ``perm_e[i mod n]`` of
    epoch ``e = i // n``, each epoch's permutation seeded by ``(seed, e)``. A pure function of
    the index, so the loader's consumed-sample count is all that exact resume needs."""

    def __init__(self, examples: Sequence[Any], seed: int) -> None:
        if not examples:
            raise ValueError("a training set needs at least one example")
        self.examples = examples
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    @lru_cache(maxsize=2)  # noqa: B019 - a handful of epochs; the dataset lives for the run
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.examples)
        example = self.examples[int(self._permutation(index // n)[index % n])]
        return {"example": example, "weight": 1.0}


class EvalDataset:
    """Each example once, in file order; indices past the end give weight-0 padding (the first
    example again) so that every data-parallel rank runs the same number of micro-batches."""

    def __init__(self, examples: Sequence[Any]) -> None:
        if not examples:
            raise ValueError("an evaluation set needs at least one example")
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.examples):
            return {"example": self.examples[index], "weight": 1.0}
        return {"example": self.examples[0], "weight": 0.0}
