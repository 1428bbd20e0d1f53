"""Data configuration: the corpus, its split and blend, and the blank-infilling objectives (GLM_SPEC §3).

Field names follow the official GLM arguments so recipes move over unchanged; ``add_data_args`` and
``DataConfig.from_args`` give ``pretrain_glm.py`` and ``tools/show_samples.py`` the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Token-span lengths are Poisson(avg_block_length) truncated to 1..MAX_BLOCK_LENGTH-1 (official
# ConstructBlockStrategy: max_block_length=40, exclusive).
MAX_BLOCK_LENGTH = 40


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass
class BlankInfillingConfig:
    """Knobs of the blank-infilling objectives, with the official names (see docs/blank-infilling.md).

    One objective is drawn per micro-batch: token spans with ``bert_prob``, sentences with
    ``gap_sentence_prob``, a document span (gpt) with the rest.
    """

    bert_prob: float = 0.5
    gap_sentence_prob: float = 0.0
    gap_sentence_ratio: float = 0.15
    bert_ratio: float = 0.15  # fraction of tokens covered by token spans (no official flag)
    gpt_infill_prob: float = 0.5
    gpt_min_ratio: float = 0.5
    avg_block_length: float = 3.0
    short_seq_prob: float = 0.0
    single_span_prob: float = 0.0
    task_mask: bool = False
    block_mask_prob: float = 0.0
    shuffle_blocks: bool = True  # --no-shuffle-block turns it off
    block_position_encoding: bool = True  # --no-block-position turns it off
    sentinel_token: bool = False

    def __post_init__(self) -> None:
        for name in (
            "bert_prob",
            "gap_sentence_prob",
            "gpt_infill_prob",
            "short_seq_prob",
            "single_span_prob",
            "block_mask_prob",
        ):
            _check_probability(name, getattr(self, name))
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9:
            raise ValueError(
                f"bert_prob ({self.bert_prob}) + gap_sentence_prob ({self.gap_sentence_prob}) "
                "exceeds 1; the gpt objective gets the rest"
            )
        for name in ("gap_sentence_ratio", "bert_ratio"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if not 0.0 <= self.gpt_min_ratio < 1.0:
            raise ValueError(f"gpt_min_ratio must be in [0, 1), got {self.gpt_min_ratio}")
        if not 0.0 < self.avg_block_length < MAX_BLOCK_LENGTH - 1:
            raise ValueError(
                f"avg_block_length must be in (0, {MAX_BLOCK_LENGTH - 1}), got {self.avg_block_length}"
            )

    @property
    def gpt_prob(self) -> float:
        return max(0.0, 1.0 - self.bert_prob - self.gap_sentence_prob)


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """``["a"]`` -> ``[(1.0, "a")]``; ``["0.3", "a", "0.7", "b"]`` -> normalised weights and prefixes."""
    if not data_path:
        raise ValueError("data_path is empty: give one prefix or 'weight prefix' pairs")
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise ValueError(
            f"data_path with several datasets must be 'weight prefix' pairs, got {data_path}"
        )
    pairs = []
    for weight, prefix in zip(data_path[0::2], data_path[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(
                f"data_path weight {weight!r} (before {prefix!r}) is not a number"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"data_path weight for {prefix!r} must be >= 0, got {weight}")
        pairs.append((w, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise ValueError(f"data_path weights sum to {total}; at least one must be positive")
    return [(w / total, p) for w, p in pairs]


def parse_split(split: str) -> tuple[float, float, float]:
    """``"949,50,1"`` -> train/valid/test fractions (missing parts are 0, as in Megatron)."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"split must be comma-separated numbers like '949,50,1', got {split!r}"
        ) from None
    if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts):
        raise ValueError(f"split must be 1 to 3 non-negative numbers, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if total <= 0:
        raise ValueError(f"split {split!r} sums to 0")
    return (parts[0] / total, parts[1] / total, parts[2] / total)


@dataclass
class DataConfig:
    """Where the tokens come from and how samples are cut.

    ``seq_length`` is the model input length ``L_max``: every micro-batch is ``[b, seq_length]``.
    The raw packed sample is shorter (``raw_sample_length``) so that Part A + Part B always fit; see
    ``megatron_glm.data.blank_infilling.fixed_shape_plan``.
    """

    data_path: list[str] = field(default_factory=list)
    split: str = "949,50,1"
    seq_length: int = 512
    seed: int = 1234
    num_workers: int = 2
    index_cache_dir: str | None = None  # None: next to each dataset's .idx file
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    infilling: BlankInfillingConfig = field(default_factory=BlankInfillingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):
            self.data_path = self.data_path.split()
        self.data_path = [str(p) for p in self.data_path]
        if self.data_path:
            parse_data_path(self.data_path)
        parse_split(self.split)
        if not isinstance(self.seq_length, int) or self.seq_length < 16:
            raise ValueError(f"seq_length must be an integer >= 16, got {self.seq_length!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                f"num_workers must be a non-negative integer, got {self.num_workers!r}"
            )
        if isinstance(self.infilling, dict):
            self.infilling = BlankInfillingConfig(**self.infilling)

    @property
    def weighted_paths(self) -> list[tuple[float, str]]:
        return parse_data_path(self.data_path)

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return parse_split(self.split)

    @property
    def raw_sample_length(self) -> int:
        """Tokens per packed raw sample ``n`` (``n + 2 * max_spans <= seq_length``)."""
        from megatron_glm.data.blank_infilling import fixed_shape_plan

        return fixed_shape_plan(self.seq_length, self.infilling).raw_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DataConfig:
        """Build from a namespace parsed with ``add_data_args``."""
        infilling = BlankInfillingConfig(
            bert_prob=args.bert_prob,
            gap_sentence_prob=args.gap_sentence_prob,
            gap_sentence_ratio=args.gap_sentence_ratio,
            gpt_infill_prob=args.gpt_infill_prob,
            gpt_min_ratio=args.gpt_min_ratio,
            avg_block_length=args.avg_block_length,
            short_seq_prob=args.short_seq_prob,
            single_span_prob=args.single_span_prob,
            task_mask=args.task_mask,
            block_mask_prob=args.block_mask_prob,
            shuffle_blocks=not args.no_shuffle_block,
            block_position_encoding=not args.no_block_position,
            sentinel_token=args.sentinel_token,
        )
        return cls(
            data_path=list(args.data_path or []),
            split=args.split,
            seq_length=args.seq_length,
            seed=args.seed,
            num_workers=args.num_workers,
            index_cache_dir=args.data_cache_dir,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            infilling=infilling,
        )


def add_data_args(
    parser: argparse.ArgumentParser, *, include_seed: bool = True
) -> argparse.ArgumentParser:
    """Add the data, tokenizer and blank-infilling flags (official GLM names) to ``parser``.

    ``include_seed=False`` leaves ``--seed`` to a caller that already defines it (the same value
    seeds the data pipeline).
    """
    d = BlankInfillingConfig()
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="indexed dataset prefix, or 'weight prefix weight prefix ...' to blend",
    )
    g.add_argument("--split", default="949,50,1", help="train,valid,test proportions by documents")
    g.add_argument("--seq-length", type=int, default=512, help="model input length (every batch)")
    if include_seed:
        g.add_argument("--seed", type=int, default=1234, help="seed of sampling and masking")
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    g.add_argument(
        "--data-cache-dir",
        default=None,
        help="where sample indices are cached (default: next to each dataset)",
    )
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g = parser.add_argument_group("blank infilling (GLM_SPEC §3)")
    g.add_argument("--bert-prob", type=float, default=d.bert_prob)
    g.add_argument("--gap-sentence-prob", type=float, default=d.gap_sentence_prob)
    g.add_argument("--gap-sentence-ratio", type=float, default=d.gap_sentence_ratio)
    g.add_argument("--gpt-infill-prob", type=float, default=d.gpt_infill_prob)
    g.add_argument("--gpt-min-ratio", type=float, default=d.gpt_min_ratio)
    g.add_argument("--avg-block-length", type=float, default=d.avg_block_length)
    g.add_argument("--short-seq-prob", type=float, default=d.short_seq_prob)
    g.add_argument("--single-span-prob", type=float, default=d.single_span_prob)
    g.add_argument("--task-mask", action="store_true", help="[sMASK]/[gMASK] for sentence/gpt")
    g.add_argument("--block-mask-prob", type=float, default=d.block_mask_prob)
    g.add_argument("--no-shuffle-block", action="store_true", help="Part B spans left to right")
    g.add_argument("--no-block-position", action="store_true", help="block positions all 1")
    g.add_argument("--sentinel-token", action="store_true", help="numbered [MASKi]/[sopi] tokens")
    return parser
