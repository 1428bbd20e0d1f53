"""Patterns and verbalizers of GLM's SuperGLUE cloze tasks, and the generic cloze format.

A *pattern* turns one example (a JSON object of the public SuperGLUE jsonl files, as distributed)
into text with exactly one blank; a *verbalizer* gives each label a text that fills the blank.
The patterns, their ids and the verbalizers are the ones the GLM paper used (docs/finetuning.md
lists them). Each pattern is a list of parts: a string, a ``Shortenable`` string (cut from its end
when the example does not fit) or ``BLANK``.

``READERS[task]`` is the task: its file names, label list, pattern ids, whether its verbalizers
are multi-token, and ``fill(obj, pattern_id) -> Filled`` (raising ``KeyError``/``TypeError`` for
a malformed object, which the caller reports with the file and line).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class _Blank:
    def __repr__(self) -> str:
        return "BLANK"


BLANK = _Blank()


@dataclass(frozen=True)
class Shortenable:
    text: str


Part = str | Shortenable | _Blank


@dataclass(frozen=True)
class Filled:
    """An example after its pattern: the parts, one text per candidate, the gold candidate."""

    parts: list[Part]
    candidates: list[str]
    label: int | None


@dataclass(frozen=True)
class ClozeReader:
    """One cloze task: how its files are named and read."""

    name: str
    fields: dict[str, type | tuple[type, ...]]  # required fields and their JSON types
    pattern_ids: tuple[int, ...]
    fill: Callable[[dict[str, Any], int], Filled]
    labels: tuple[Any, ...] = ()  # the JSON label values in candidate order (empty: an index)
    multi_token: bool = False  # the candidates are phrases (official: always --multi-token)
    f1: bool = False  # the task reports macro F1 besides accuracy


def _no_final_punct(text: str) -> str:
    return text.rstrip(string.punctuation)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _label_index(reader_labels: tuple[Any, ...], obj: dict[str, Any]) -> int | None:
    if "label" not in obj:
        return None
    value = obj["label"]
    if value not in reader_labels or isinstance(value, bool) != isinstance(reader_labels[0], bool):
        raise ValueError(f"label {value!r} is not one of {list(reader_labels)}")
    return reader_labels.index(value)


# ---- BoolQ: passage, question, label true/false ------------------------------------------------
_BOOLQ_LABELS = (False, True)


def _boolq(obj: dict[str, Any], pattern_id: int) -> Filled:
    passage, question = Shortenable(obj["passage"]), Shortenable(" " + obj["question"])
    if pattern_id < 2:
        parts = [passage, " Question:", question, "? Answer:", BLANK, "."]
    elif pattern_id < 4:
        parts = [passage, " Based on the previous passage,", question, "?", BLANK, "."]
    else:
        parts = ["Based on the following passage", question, "?", BLANK, "."]
        parts.append(Shortenable(" " + obj["passage"]))
    words = (" No", " Yes") if pattern_id % 2 == 0 else (" false", " true")
    return Filled(parts, list(words), _label_index(_BOOLQ_LABELS, obj))


# ---- RTE and CB: premise, hypothesis ------------------------------------------------------------
_RTE_LABELS = ("entailment", "not_entailment")
_CB_LABELS = ("contradiction", "entailment", "neutral")


def _entailment_parts(obj: dict[str, Any], pattern_id: int, question: str) -> list[Part]:
    premise = obj["premise"]
    hypothesis = _no_final_punct(obj["hypothesis"])
    if pattern_id == 0:
        return ['"', Shortenable(hypothesis), '" ?', BLANK, ",", ' "', Shortenable(premise), '"']
    if pattern_id == 1:
        return [Shortenable(hypothesis), "?", BLANK, ",", Shortenable(" " + premise)]
    if pattern_id == 2:
        return ['"', Shortenable(hypothesis), '" ?', BLANK, '. "', Shortenable(premise), '"']
    if pattern_id == 3:
        return [Shortenable(hypothesis), "?", BLANK, ".", Shortenable(" " + premise)]
    return [
        Shortenable(premise),
        " question:",
        Shortenable(" " + obj["hypothesis"]),
        question,
        " answer:",
        BLANK,
    ]


def _rte(obj: dict[str, Any], pattern_id: int) -> Filled:
    parts = _entailment_parts(obj, pattern_id, " True or False?")
    words = (" true", " false") if pattern_id == 4 else (" Yes", " No")
    return Filled(parts, list(words), _label_index(_RTE_LABELS, obj))


def _cb(obj: dict[str, Any], pattern_id: int) -> Filled:
    parts = _entailment_parts(obj, pattern_id, " true, false or neither?")
    words = (" false", " true", " neither") if pattern_id == 4 else (" No", " Yes", " Maybe")
    return Filled(parts, list(words), _label_index(_CB_LABELS, obj))


# ---- COPA: premise, choice1, choice2, question cause/effect, label 0/1 --------------------------
def _copa(obj: dict[str, Any], pattern_id: int) -> Filled:
    if obj["question"] not in ("cause", "effect"):
        raise ValueError(f"question must be 'cause' or 'effect', got {obj['question']!r}")
    premise = Shortenable(_no_final_punct(" " + obj["premise"]))
    one = _no_final_punct(_lower_first(obj["choice1"]))
    two = _no_final_punct(_lower_first(obj["choice2"]))
    joiner = " because" if obj["question"] == "cause" else ", so"
    if pattern_id == 0:
        parts = ['"', one, '" or "', two, '"?', premise, joiner, BLANK, "."]
    else:
        parts = [one, " or", " " + two, "?", premise, joiner, BLANK, "."]
    return Filled(parts, [" " + one, " " + two], _label_index((0, 1), obj))


# ---- WiC: word, sentence1, sentence2, label true/false ------------------------------------------
def _wic(obj: dict[str, Any], pattern_id: int) -> Filled:
    word, one, two = obj["word"], obj["sentence1"], obj["sentence2"]
    if pattern_id == 0:
        parts = [Shortenable(f'"{one}" / "{two}"'), f' Similar sense of "{word}"?', BLANK, "."]
    elif pattern_id == 1:
        parts = [
            Shortenable(one),
            Shortenable(" " + two),
            f" Does {word} have the same meaning in both sentences?",
            BLANK,
        ]
    else:
        parts = [word, " .", ' Sense (1) (a) "', Shortenable(one), '"', " (", BLANK, f') "{two}"']
    words = ("2", "b") if pattern_id == 2 else (" No", " Yes")
    return Filled(parts, list(words), _label_index(_BOOLQ_LABELS, obj))


# ---- generic: {"text": "... [MASK] ...", "choices": [...], "label": i} --------------------------
GENERIC_BLANK = "[MASK]"


def _generic(obj: dict[str, Any], pattern_id: int) -> Filled:
    text, choices = obj["text"], obj["choices"]
    if text.count(GENERIC_BLANK) != 1:
        raise ValueError(
            f"text must hold exactly one {GENERIC_BLANK}, found {text.count(GENERIC_BLANK)}"
        )
    if not choices:
        raise ValueError("choices is empty")
    if not all(isinstance(c, str) and c for c in choices):
        raise ValueError("every choice must be a non-empty string")
    before, after = text.split(GENERIC_BLANK)
    label = obj.get("label")
    if label is not None and (
        not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices)
    ):
        raise ValueError(f"label {label!r} is out of range for {len(choices)} choices")
    return Filled([Shortenable(before), BLANK, after], list(choices), label)


READERS: dict[str, ClozeReader] = {
    r.name: r
    for r in (
        ClozeReader(
            "boolq",
            {"passage": str, "question": str},
            (0, 1, 2, 3, 4, 5),
            _boolq,
            _BOOLQ_LABELS,
        ),
        ClozeReader(
            "cb", {"premise": str, "hypothesis": str}, (0, 1, 2, 3, 4), _cb, _CB_LABELS, f1=True
        ),
        ClozeReader("rte", {"premise": str, "hypothesis": str}, (0, 1, 2, 3, 4), _rte, _RTE_LABELS),
        ClozeReader(
            "copa",
            {"premise": str, "choice1": str, "choice2": str, "question": str},
            (0, 1),
            _copa,
            (0, 1),
            multi_token=True,
        ),
        ClozeReader(
            "wic",
            {"word": str, "sentence1": str, "sentence2": str},
            (0, 1, 2),
            _wic,
            _BOOLQ_LABELS,
        ),
        ClozeReader("generic", {"text": str, "choices": list}, (0,), _generic, multi_token=True),
    )
}
