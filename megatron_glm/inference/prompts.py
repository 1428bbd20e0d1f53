"""Prompts: text with blanks -> Part A ids, and the blanks' positions (docs/generation.md#prompts).

A prompt is GLM's Part A: ``[CLS] text [eos]`` with one mask token per blank (``[MASK]`` for a
short span, ``[sMASK]`` for a sentence, ``[gMASK]`` for a long generation at the end, as the
pretraining objectives use them). Text prompts are framed the way the official
``generate_samples.py`` frames them; id prompts are taken as the complete Part A.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_glm.data.tokenizers import GLMTokenizer
from megatron_glm.tasks.data import read_jsonl

__all__ = [
    "BLANK_TEXTS",
    "Prompt",
    "blank_ids",
    "encode_prompt",
    "prepare_prompt",
    "read_prompt_file",
]

BLANK_TEXTS = ("[MASK]", "[sMASK]", "[gMASK]")


def blank_ids(tokenizer: GLMTokenizer) -> frozenset[int]:
    """The ids of ``[MASK]``, ``[sMASK]`` and ``[gMASK]``."""
    return frozenset((tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id))


def encode_prompt(tokenizer: GLMTokenizer, text: str, append_blank: str = "[gMASK]") -> list[int]:
    """Part A of a text prompt: ``[CLS]`` + the ids of ``text`` + ``[eos]``, without the ``[eos]``
    when the text ends with ``[gMASK]`` (the pretraining's document-level span is a suffix, so
    its Part A ends with the mask). A text without any blank gets ``append_blank`` at its end
    (the official code appends ``[gMASK]`` with ``--task-mask``, ``[MASK]`` without).

    Whitespace tokens right before a blank are dropped: in pretraining a blank replaces its
    span's tokens, whitespace included. The official tokenizers strip that whitespace
    themselves; a sentencepiece model with reserved command tokens encodes it as a piece of its
    own (also at the very start: ``"[MASK] x"`` is ``▁ [MASK] ▁x``)."""
    if append_blank not in BLANK_TEXTS:
        raise ValueError(f"append_blank must be one of {BLANK_TEXTS}, got {append_blank!r}")
    blanks = blank_ids(tokenizer)
    encoded = tokenizer.encode(text)
    if not blanks & set(encoded):
        encoded = tokenizer.encode(text + append_blank)
    ids = [tokenizer.cls_id]
    for token in encoded:
        while (
            token in blanks
            and ids[-1] != tokenizer.cls_id
            and not tokenizer.decode(ids[-1:]).strip()
        ):
            ids.pop()  # whitespace before a blank
        ids.append(token)
    if ids[-1] != tokenizer.gmask_id:
        ids.append(tokenizer.eos_id)
    return ids


@dataclass(frozen=True)
class Prompt:
    """One prompt ready to run: Part A and the positions of its blanks, left to right."""

    ids: tuple[int, ...]
    blank_positions: tuple[int, ...]
    # ids[body[0]:body[1]] is what the user wrote: all ids, or the text inside the framing
    body: tuple[int, int]

    def fill(self, blanks: Sequence[Sequence[int]]) -> list[int]:
        """The body with each blank replaced by its ids (a prompt with more blanks than
        ``blanks`` keeps the rest)."""
        out: list[int] = []
        start = self.body[0]
        for position, filled in zip(self.blank_positions, blanks):
            out += [*self.ids[start:position], *filled]
            start = position + 1
        out += self.ids[start : self.body[1]]
        return out


def prepare_prompt(
    tokenizer: GLMTokenizer,
    prompt: str | Sequence[int],
    max_length: int,
    label: str,
    append_blank: str = "[gMASK]",
) -> Prompt:
    """Encode ``prompt`` (text, or the ids of a complete Part A) and find its blanks; a prompt
    longer than ``max_length`` tokens or ids without a blank are a ``ValueError`` starting with
    ``label`` (e.g. ``"prompt 3"``, ``"prompts.jsonl:7"``)."""
    if isinstance(prompt, str):
        ids = encode_prompt(tokenizer, prompt, append_blank)
        body = (1, len(ids) - (ids[-1] == tokenizer.eos_id))
    else:
        ids = [int(i) for i in prompt]
        body = (0, len(ids))
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ValueError(
                f"{label}: ids {bad[:5]} outside the tokenizer's {tokenizer.vocab_size}"
            )
    positions = tuple(i for i, token in enumerate(ids) if token in blank_ids(tokenizer))
    if not positions:
        raise ValueError(f"{label}: no [MASK], [sMASK] or [gMASK] to fill in {ids[:20]}")
    if len(ids) > max_length:
        raise ValueError(
            f"{label}: the prompt has {len(ids)} tokens; the model takes at most {max_length} "
            "(max_sequence_length): shorten it"
        )
    return Prompt(tuple(ids), positions, body)


def read_prompt_file(path: str) -> list[tuple[int, dict[str, Any]]]:
    """The records of a jsonl prompt file with their line numbers: one JSON object per non-empty
    line with a ``"prompt"`` (text, or a list of ids). Every bad line is reported at once
    (``ValueError``, file:line)."""
    records, problems = [], []
    for record in read_jsonl(path, problems):
        prompt = record.obj.get("prompt")
        text = isinstance(prompt, str) and bool(prompt.strip())
        ids = isinstance(prompt, list) and bool(prompt) and all(type(i) is int for i in prompt)
        if text or ids:
            records.append((record.line, record.obj))
        else:
            problems.append(f'{record.where}: needs a "prompt": non-empty text or a list of ids')
    if problems:
        raise ValueError("\n".join(problems))
    return records
