"""Small synthetic task files in the public formats, written by the tests.

``write_boolq``: a two-label task in the SuperGLUE BoolQ jsonl format whose answer is whether the
passage names a ``red`` or a ``blue`` thing (everything else is noise words), so a tiny model can
learn it in a few hundred steps. ``write_seq2seq``: ``{"source", "target"}`` pairs whose target is
the source's words reversed (or copied).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "the",
    "module",
    "returns",
    "a",
    "list",
    "of",
    "values",
    "from",
    "each",
    "file",
    "and",
    "the",
    "function",
    "reads",
    "the",
    "data",
    "in",
    "order",
    "with",
    "one",
    "object",
    "per",
    "line",
    "for",
    "every",
    "name",
]

# one sentencepiece token each with the tests' tokenizer: a copy is token for token
SEQ2SEQ_WORDS = ("module", "function", "object", "type", "call", "set", "new", "use")


def _boolq_example(rng: random.Random, index: int) -> dict[str, object]:
    answer = rng.random() < 0.5
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
    words.insert(rng.randint(0, len(words)), "red" if answer else "blue")
    return {
        "question": "red",
        "passage": " ".join(words) + ".",
        "idx": index,
        "label": answer,
    }


def write_boolq(directory: Path, num_train: int, num_valid: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.jsonl", num_train), ("val.jsonl", num_valid)):
        with open(directory / name, "w", encoding="utf-8") as f:
            for i in range(count):
                f.write(json.dumps(_boolq_example(rng, i)) + "\n")
    return directory


def write_seq2seq(
    directory: Path, num_train: int, num_valid: int, *, reverse: bool, seed: int = 0
) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.jsonl", num_train), ("val.jsonl", num_valid)):
        with open(directory / name, "w", encoding="utf-8") as f:
            for _ in range(count):
                words = [rng.choice(SEQ2SEQ_WORDS) for _ in range(rng.randint(2, 4))]
                target = words[::-1] if reverse else words
                f.write(json.dumps({"source": " ".join(words), "target": " ".join(target)}) + "\n")
    return directory
