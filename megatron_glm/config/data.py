"""Data configuration: the corpus, its split and blend, the tokenizer, and the blank-infilling
objectives (docs/blank-infilling.md).

Field names follow the official GLM arguments so recipes move over unchanged; ``add_data_args`` and
``DataConfig.from_args`` give ``pretrain_glm.py`` and ``tools/show_samples.py`` the same flags, and
``add_tokenizer_args`` gives ``tools/preprocess_data.py`` the same tokenizer flags.

Lengths (the official GLM's meaning): ``--seq-length`` is the raw sample length n, the tokens packed
from the corpus into one sample. Blank infilling adds two tokens per span (Part B's ``[sop]`` and the
mask token that stays in Part A), so the model input is longer: ``L = n + 2 K(n)`` with ``K(n)`` a cap
on the spans of one sample (``plan_for_raw_length``). Every micro-batch is ``[b, L]``. This module is
pure Python (no torch, no data package) so that any tool can validate a configuration cheaply.
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
# Margin of the span cap over the mean number of token spans, in standard deviations (see
# ``max_spans``).
_SPAN_CAP_SIGMAS = 4.0
# Smallest raw sample blank infilling accepts.
MIN_RAW_LENGTH = 8

# Tokenizer names (Megatron's and the official GLM's); megatron_glm.data.tokenizers has one builder
# per name. docs/tokenizers.md describes each.
TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "ChineseSPTokenizer",
    "GPT2BPETokenizer",
    "BertWordPieceTokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "HuggingFaceTokenizer",
)


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


def span_length_probabilities(avg_block_length: float) -> list[float]:
    """P(span length = l) for l = 1..MAX_BLOCK_LENGTH-1: Poisson(avg) truncated and renormalised."""
    log_pmf = [
        length * math.log(avg_block_length) - avg_block_length - math.lgamma(length + 1)
        for length in range(1, MAX_BLOCK_LENGTH)
    ]
    pmf = [math.exp(x) for x in log_pmf]
    total = sum(pmf)
    return [p / total for p in pmf]


def max_spans(raw_length: int, config: BlankInfillingConfig) -> int:
    """The span cap K(n) of a raw sample of n tokens (token spans and sentences; gpt has one).

    K(n) = ceil(m/mu + 4 sqrt(m var / mu^3)) + 2 with m = floor(ratio * n) (the larger of
    bert_ratio and gap_sentence_ratio) and mu, var the mean and variance of a span length: the
    number of Poisson spans needed to cover m tokens is a renewal count with that mean and
    variance, so the cap rarely binds (measured: 2 in 10^6 samples at n = 446); when it does, the
    spans drawn are lengthened (to at most 39 tokens) until they cover m.
    """
    m = int(max(config.bert_ratio, config.gap_sentence_ratio) * raw_length)
    if m == 0:
        return 1
    probs = span_length_probabilities(config.avg_block_length)
    mu = sum(length * p for length, p in enumerate(probs, start=1))
    var = sum(length * length * p for length, p in enumerate(probs, start=1)) - mu * mu
    return math.ceil(m / mu + _SPAN_CAP_SIGMAS * math.sqrt(m * var / mu**3)) + 2


@dataclass(frozen=True)
class FixedShapePlan:
    """``raw_length + 2 * max_spans <= input_length``: every objective's Part A + Part B fits."""

    input_length: int  # L, the model input length of every micro-batch
    raw_length: int  # n, tokens per packed raw sample (--seq-length)
    max_spans: int  # K, cap on spans per sample (token spans and sentences)


def plan_for_raw_length(raw_length: int, config: BlankInfillingConfig) -> FixedShapePlan:
    """The input length that raw samples of ``raw_length`` tokens need: ``n + 2 K(n)``."""
    if raw_length < MIN_RAW_LENGTH:
        raise ValueError(
            f"seq_length {raw_length} is too short for blank infilling (at least {MIN_RAW_LENGTH})"
        )
    k = max_spans(raw_length, config)
    return FixedShapePlan(input_length=raw_length + 2 * k, raw_length=raw_length, max_spans=k)


def fixed_shape_plan(input_length: int, config: BlankInfillingConfig) -> FixedShapePlan:
    """The inverse: the longest raw sample whose plan fits ``input_length`` (n + 2 K(n) grows
    strictly with n, so ``fixed_shape_plan(plan_for_raw_length(n).input_length)`` gives n back)."""
    n = input_length - 2
    while n >= MIN_RAW_LENGTH and n + 2 * max_spans(n, config) > input_length:
        n -= 1
    if n < MIN_RAW_LENGTH:
        raise ValueError(
            f"input length {input_length} is too short for blank infilling (raw length {n})"
        )
    return FixedShapePlan(input_length=input_length, raw_length=n, max_spans=max_spans(n, config))


# TokenizerSpec fields that are flags of add_tokenizer_args (and fields of DataConfig) by that name.
_TOKENIZER_FLAGS = (
    "tokenizer_type",
    "tokenizer_model",
    "vocab_file",
    "merge_file",
    "tokenizer_model_type",
    "fix_command_token",
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer, from which local files (``megatron_glm.data.tokenizers.tokenizer_from_spec``
    builds it; worker processes rebuild it from this, never from a pickle)."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    # the official --tokenizer-model-type: bert-base-uncased, bert-large-uncased, gpt2, roberta, ...
    tokenizer_model_type: str | None = None
    # the official --fix-command-token (ChineseSPTokenizer's alternative command-token ids)
    fix_command_token: bool = False
    # append [dBLOCK] after the command tokens (the official code does when --block-mask-prob > 0:
    # block masking replaces Part B input tokens with it); data files never contain it
    block_mask_token: bool = False

    def __post_init__(self) -> None:
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(
                f"unknown tokenizer type {self.tokenizer_type!r}; choose from "
                f"{', '.join(TOKENIZER_TYPES)}"
            )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(data_path: list[str]) -> list[tuple[float | None, str]]:
    """``["a"]`` -> ``[(1.0, "a")]``; ``["0.3", "a", "0.7", "b"]`` -> normalised weights and
    prefixes; ``["a", "b"]`` (several prefixes, no weights) -> ``[(None, "a"), (None, "b")]``:
    as in Megatron, such a blend weighs each dataset by its number of samples."""
    if not data_path:
        raise ValueError("data_path is empty: give one prefix or 'weight prefix' pairs")
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if not any(_is_number(item) for item in data_path):
        return [(None, prefix) for prefix in data_path]
    if len(data_path) % 2:
        raise ValueError(
            f"data_path with several datasets must be 'weight prefix' pairs or prefixes alone, "
            f"got {data_path}"
        )
    pairs = []
    for weight, prefix in zip(data_path[0::2], data_path[1::2]):
        if not _is_number(weight):
            raise ValueError(f"data_path weight {weight!r} (before {prefix!r}) is not a number")
        w = float(weight)
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

    ``seq_length`` is the raw sample length n (the official GLM's ``--seq-length``); the model input
    is longer, ``input_length = n + 2 K(n)`` (``shape_plan``), so that Part A + Part B always fit.
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
    tokenizer_model_type: str | None = None
    fix_command_token: bool = False
    infilling: BlankInfillingConfig = field(default_factory=BlankInfillingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):
            self.data_path = self.data_path.split()
        self.data_path = [str(p) for p in self.data_path]
        if self.data_path:
            parse_data_path(self.data_path)
        parse_split(self.split)
        if not isinstance(self.seq_length, int) or self.seq_length < MIN_RAW_LENGTH:
            raise ValueError(
                f"seq_length must be an integer >= {MIN_RAW_LENGTH}, got {self.seq_length!r}"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                f"num_workers must be a non-negative integer, got {self.num_workers!r}"
            )
        if isinstance(self.infilling, dict):
            self.infilling = BlankInfillingConfig(**self.infilling)

    @property
    def weighted_paths(self) -> list[tuple[float | None, str]]:
        return parse_data_path(self.data_path)

    @property
    def split_fractions(self) -> tuple[float, float, float]:
        return parse_split(self.split)

    @property
    def raw_sample_length(self) -> int:
        """Tokens per packed raw sample ``n``: ``--seq-length``."""
        return self.seq_length

    @property
    def shape_plan(self) -> FixedShapePlan:
        return plan_for_raw_length(self.seq_length, self.infilling)

    @property
    def input_length(self) -> int:
        """The model input length L of every micro-batch (raw length + Part B's extra tokens)."""
        return self.shape_plan.input_length

    @property
    def tokenizer_spec(self) -> TokenizerSpec:
        if self.tokenizer_type is None:
            raise ValueError("no tokenizer type configured (--tokenizer-type)")
        return TokenizerSpec(
            **{name: getattr(self, name) for name in _TOKENIZER_FLAGS},
            block_mask_token=self.infilling.block_mask_prob > 0,
        )

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
            tokenizer_model_type=args.tokenizer_model_type,
            fix_command_token=args.fix_command_token,
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
    g.add_argument(
        "--seq-length",
        type=int,
        default=512,
        help="raw sample length (tokens packed per sample, as in the official GLM); the model "
        "input adds two tokens per blank and is printed at start-up",
    )
    if include_seed:
        g.add_argument("--seed", type=int, default=1234, help="seed of sampling and masking")
    g.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    g.add_argument(
        "--data-cache-dir",
        default=None,
        help="where sample indices are cached (default: next to each dataset)",
    )
    add_tokenizer_args(parser)
    g = parser.add_argument_group("blank infilling (docs/blank-infilling.md)")
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


def add_tokenizer_args(
    parser: argparse.ArgumentParser, *, required: bool = False
) -> argparse.ArgumentParser:
    """The tokenizer flags, shared by training, preprocessing and the inspection tools, so a corpus
    is preprocessed with exactly the tokenizer flags of its training recipe."""
    g = parser.add_argument_group("tokenizer (docs/tokenizers.md)")
    g.add_argument("--tokenizer-type", default=None, required=required, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece .model, or a tokenizer.json / its directory for HuggingFaceTokenizer",
    )
    g.add_argument("--vocab-file", default=None, help="BERT vocab.txt or GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument(
        "--tokenizer-model-type",
        default=None,
        help="the official GLM's vocabulary name (bert-base-uncased, bert-large-uncased, gpt2, "
        "roberta); without --vocab-file the released vocabulary bundled with megatron_glm is used",
    )
    g.add_argument(
        "--fix-command-token",
        action="store_true",
        help="ChineseSPTokenizer: the official alternative command-token ids",
    )
    return parser


def tokenizer_spec_from_args(args: argparse.Namespace) -> TokenizerSpec:
    """The ``TokenizerSpec`` of a namespace parsed with ``add_tokenizer_args``."""
    return TokenizerSpec(**{name: getattr(args, name) for name in _TOKENIZER_FLAGS})
