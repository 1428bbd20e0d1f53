"""Zero-shot evaluation of a language model: perplexity of a text file with overlapping windows,
and LAMBADA-style last-word accuracy, each bidirectional or unidirectional (docs/finetuning.md).

Shape legend: R rows of a batch, s the batch's longest row, v vocab.

Perplexity. Each non-empty line of the file is a document of n tokens ``d[0..n)``. Windows hold
``W`` (``--seq-length``) tokens and advance by ``S`` (``--overlapping-eval``, default ``W``):
window k covers ``d[kS : kS + W]``, and there are ``1 + ceil(max(n - W, 0) / S)`` of them. Window 0
scores ``d[1:W]`` with ``d[0]`` as context; window k > 0 scores the tokens the previous window did
not reach, ``d[(k-1)S + W : kS + W]`` (at most S), with the rest of the window, ``W - S`` tokens,
as context (none when S = W: windows that do not overlap start afresh, as the official code's).
So every token but ``d[0]`` is scored exactly once. Perplexity is ``exp(sum of token losses /
tokens scored)``.

Bidirectional and unidirectional differ only in where the context goes, as the GLM paper defines
them. Bidirectional: the context is Part A (``[CLS] context [blank]``, full attention within it)
and the scored tokens are Part B (``[sop] scored[:-1]`` -> ``scored``). Unidirectional: Part A is
``[CLS] first-token [blank]`` and everything after the first token is Part B, left to right, so
the context is a causal prefix; only the scored tokens count.

LAMBADA (jsonl of ``{"text": ...}``): the last whitespace-separated word is the answer, the text
before it the context. Bidirectional: Part A ``[CLS] context [blank] [eos]``, Part B predicts the
answer's tokens. Unidirectional: Part A ``[CLS] context[0] [blank] [eos]``, Part B predicts
``context[1:] + answer`` and only the answer counts. An example is correct when every answer token
is the model's argmax. A context too long for ``--seq-length`` loses its oldest tokens (counted
and reported).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from megatron_glm.tasks.data import Row, TaskDataError, Truncations, glm_row, stack_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowScore:
    logprob: float  # summed over the row's scored tokens
    tokens: int
    all_correct: bool  # every scored token is the argmax


def _only_last(row: Row, count: int) -> Row:
    """``row`` with its loss on the last ``count`` Part B targets only."""
    loss_mask = np.zeros_like(row.loss_mask)
    if count:
        loss_mask[row.tokens.size - count :] = 1.0
    return Row(row.tokens, row.position_ids, row.sep, row.targets, loss_mask)


def context_rows(
    context: Sequence[int],
    scored: Sequence[int],
    ids: Any,
    *,
    unidirectional: bool,
    blank: int,
    eos: bool,
) -> Row:
    """One row scoring ``scored`` after ``context`` (possibly empty), as defined above."""
    if not scored:
        raise ValueError("a scored row needs at least one scored token")
    tail = [ids.eos_id] if eos else []
    if unidirectional:
        part_a = [ids.cls_id, *context[:1], blank, *tail]
        answer = [*context[1:], *scored]
    else:
        part_a = [ids.cls_id, *context, blank, *tail]
        answer = list(scored)
    row = glm_row(part_a, part_a.index(blank), answer, ids.sop_id, ids.pad_id)
    return _only_last(row, len(scored)) if unidirectional else row


def window_spans(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, first scored, end)`` of each window over a document of ``n`` tokens."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride (--overlapping-eval) must be in [1, {window}], got {stride}")
    spans = []
    count = 1 + math.ceil(max(n - window, 0) / stride)
    for k in range(count):
        start, end = k * stride, min(k * stride + window, n)
        first = 1 if k == 0 else (k - 1) * stride + window
        if end > first:
            spans.append((start, first, end))
    return spans


def perplexity_rows(
    documents: Sequence[Sequence[int]],
    window: int,
    stride: int,
    ids: Any,
    *,
    unidirectional: bool,
    blank: int,
) -> list[Row]:
    rows = []
    for doc in documents:
        for start, first, end in window_spans(len(doc), window, stride):
            rows.append(
                context_rows(
                    doc[start:first],
                    doc[first:end],
                    ids,
                    unidirectional=unidirectional,
                    blank=blank,
                    eos=False,
                )
            )
    return rows


@dataclass(frozen=True)
class LambadaExample:
    where: str
    context: tuple[int, ...]
    answer: tuple[int, ...]


def read_lambada(path: str, tokenizer: Any) -> list[LambadaExample]:
    """``{"text": ...}`` lines: the last word's tokens as they appear in the whole text."""
    problems, examples = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = json.loads(line)["text"].strip()
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                problems.append(f"{where}: expected a JSON object with a text field ({err})")
                continue
            words = text.split()
            if len(words) < 2:
                problems.append(f"{where}: needs a context and a last word, got {text!r}")
                continue
            context_text = text[: text.rfind(words[-1])].strip()
            context, full = tokenizer.encode(context_text), tokenizer.encode(text)
            if full[: len(context)] == context and len(full) > len(context):
                answer = full[len(context) :]
            else:  # the tokenizer merged across the boundary: the word on its own
                answer = tokenizer.encode(" " + words[-1])
            examples.append(LambadaExample(where, tuple(context), tuple(answer)))
    if problems:
        raise TaskDataError(problems)
    if not examples:
        raise TaskDataError([f"{path}: holds no examples"])
    return examples


def lambada_rows(
    examples: Sequence[LambadaExample],
    max_length: int,
    ids: Any,
    *,
    unidirectional: bool,
    blank: int,
    truncations: Truncations,
) -> list[Row]:
    rows = []
    for e in examples:
        # [CLS] + context + blank + [eos] + answer (Part B: [sop] + answer[:-1])
        excess = len(e.context) + len(e.answer) + 3 - max_length
        context = e.context
        if excess > 0:
            if excess >= len(context):
                raise TaskDataError([f"{e.where}: the answer alone exceeds --seq-length"])
            context = context[excess:]
            truncations.add(e.where, excess)
        rows.append(
            context_rows(
                context, e.answer, ids, unidirectional=unidirectional, blank=blank, eos=True
            )
        )
    return rows


@torch.no_grad()
def score_rows(model: Any, rows: Sequence[Row], batch_size: int, pad: int) -> list[RowScore]:
    """Log-likelihood, scored-token count and exactness of each row under ``model`` (TP 1)."""
    device = next(model.parameters()).device
    out = []
    for begin in range(0, len(rows), batch_size):
        batch = rows[begin : begin + batch_size]
        t = stack_rows(batch, max(r.tokens.size for r in batch), pad)
        logits = model(
            t["tokens"].to(device), t["position_ids"].to(device), t["sep"].to(device)
        ).float()  # [R, s, v]
        logp = F.log_softmax(logits, dim=-1)
        targets, mask = t["targets"].to(device), t["loss_mask"].to(device) > 0
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [R, s]
        hit = logits.argmax(-1) == targets
        for r in range(len(batch)):
            m = mask[r]
            out.append(RowScore(float(token_logp[r][m].sum()), int(m.sum()), bool(hit[r][m].all())))
    return out


def perplexity_metrics(scores: Sequence[RowScore]) -> dict[str, float]:
    tokens = sum(s.tokens for s in scores)
    loss = -sum(s.logprob for s in scores) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(tokens)}


def lambada_metrics(scores: Sequence[RowScore]) -> dict[str, float]:
    return {
        "accuracy": sum(s.all_correct for s in scores) / max(len(scores), 1),
        "examples": float(len(scores)),
    }


def read_documents(path: str, tokenizer: Any) -> list[list[int]]:
    documents = [
        tokenizer.encode(line.strip())
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    documents = [d for d in documents if len(d) > 1]
    if not documents:
        raise TaskDataError([f"{path}: no line with two or more tokens to score"])
    return documents
