"""``GenerationConfig``: how blanks are filled (docs/generation.md#options)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["GenerationConfig"]


@dataclass(frozen=True)
class GenerationConfig:
    """How to fill blanks; the fields are the official ``generate_samples.py`` flags.

    ``temperature`` 0 means greedy decoding; ``num_beams`` > 1 beam search (deterministic: the
    temperature, ``top_k`` and ``top_p`` are then unused). ``out_seq_length`` and
    ``min_tgt_length`` count the tokens of one blank, the end token excluded.
    """

    out_seq_length: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_tgt_length: int = 0
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid generation config: " + "; ".join(problems))
        if self.num_beams > 1 and (self.top_k or self.top_p or self.temperature != 1.0):
            logger.warning(
                "beam search (num_beams %d) is deterministic: temperature %s, top_k %d and "
                "top_p %s have no effect",
                self.num_beams,
                self.temperature,
                self.top_k,
                self.top_p,
            )
        elif self.temperature == 0.0 and (self.top_k or self.top_p):
            logger.warning(
                "temperature 0 is greedy decoding: top_k %d and top_p %s have no effect",
                self.top_k,
                self.top_p,
            )

    def problems(self) -> list[str]:
        problems = []
        if self.out_seq_length < 1:
            problems.append(f"out_seq_length must be >= 1, got {self.out_seq_length}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            problems.append(f"top_p must be in [0, 1] (0: off), got {self.top_p}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not 0 <= self.min_tgt_length <= self.out_seq_length:
            problems.append(
                f"min_tgt_length must be in [0, out_seq_length = {self.out_seq_length}], "
                f"got {self.min_tgt_length}"
            )
        return problems
