"""Model configuration: the GLM architecture of docs/model.md and its released presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_BACKENDS = ("auto", "dense", "fused", "sdpa", "flex")


# The model-size flags of pretrain_glm.py and tools/convert_checkpoint.py: argparse dest -> field.
ARCHITECTURE_FLAGS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_sequence_length",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
}


def pad_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by`` (the official GLM does not multiply
    by the TP degree; the model checks divisibility by TP when it is built for a layout)."""
    if divisible_by <= 0:
        return vocab_size
    return -(-vocab_size // divisible_by) * divisible_by


@dataclass
class GLMConfig:
    """Architecture of one GLM. Every field is validated in ``__post_init__``.

    ``vocab_size`` is the tokenizer's vocabulary; the embedding table has ``padded_vocab_size`` rows.
    ``max_sequence_length`` is the largest absolute position; both position tables have
    ``max_sequence_length + 1`` rows, as in the official code.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_sequence_length: int
    ffn_hidden_size: int | None = None  # 4 * hidden_size when None
    hidden_dropout: float = (
        0.1  # embedding and residual-branch dropout (official output_dropout_prob)
    )
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    block_position_encoding: bool = True
    attention_backend: str = "auto"
    fused_bias_gelu: bool = True
    fused_bias_dropout_add: bool = True
    checkpoint_activations: bool = False
    # Selective recomputation (Megatron): the `fused` attention backend keeps only q, k, v and the
    # generator state, and recomputes scores, softmax and dropout mask in backward
    # (docs/model.md#attention-backends).
    recompute_attention_core: bool = True
    checkpoint_num_layers: int = 1
    # Megatron sequence parallelism under TP (docs/parallelism.md#sequence-parallelism); no effect
    # at TP 1. The model input length must divide by the TP size.
    sequence_parallel: bool = False
    seed: int = 1234  # initialisation seed: weights are a pure function of (seed, parameter name)

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "max_sequence_length",
            "checkpoint_num_layers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.ffn_hidden_size <= 0:
            raise ValueError(f"ffn_hidden_size must be positive, got {self.ffn_hidden_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if not isinstance(self.sequence_parallel, bool):
            raise ValueError(f"sequence_parallel must be a bool, got {self.sequence_parallel!r}")
        if self.layernorm_epsilon <= 0 or self.init_method_std <= 0:
            raise ValueError(
                f"layernorm_epsilon ({self.layernorm_epsilon}) and init_method_std "
                f"({self.init_method_std}) must be positive"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by)

    def num_parameters(self) -> int:
        """Parameter count, ``V*h + 2*(S+1)*h + L*(12h^2 + 13h) + 2h`` for the default FFN width."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attn, mlp, two LayerNorms
        num_tables = 2 if self.block_position_encoding else 1
        return (
            self.padded_vocab_size * h
            + num_tables * (self.max_sequence_length + 1) * h
            + L * per_layer
            + 2 * h
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Released GLM sizes (docs/model.md#presets): layers / hidden / heads with head dim 64.
_BERT_VOCAB, _GPT2_VOCAB = 30592, 50304
PRESETS: dict[str, dict[str, Any]] = {
    # a few-MB model for tests and the CPU quickstart
    "tiny": dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        vocab_size=1024,
        max_sequence_length=128,
    ),
    "base": dict(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        vocab_size=_BERT_VOCAB,
        max_sequence_length=512,
    ),
    "large": dict(
        num_layers=24,
        hidden_size=1024,
        num_attention_heads=16,
        vocab_size=_BERT_VOCAB,
        max_sequence_length=512,
    ),
    "410m": dict(
        num_layers=30,
        hidden_size=1024,
        num_attention_heads=16,
        vocab_size=_BERT_VOCAB,
        max_sequence_length=512,
    ),
    "515m": dict(
        num_layers=30,
        hidden_size=1152,
        num_attention_heads=18,
        vocab_size=_BERT_VOCAB,
        max_sequence_length=512,
    ),
    "2b": dict(
        num_layers=36,
        hidden_size=2048,
        num_attention_heads=32,
        vocab_size=_GPT2_VOCAB,
        max_sequence_length=1024,
    ),
    "10b": dict(
        num_layers=48,
        hidden_size=4096,
        num_attention_heads=64,
        vocab_size=_GPT2_VOCAB,
        max_sequence_length=1024,
    ),
}
