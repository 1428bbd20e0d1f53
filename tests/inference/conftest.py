"""A small random GLM and the bundled 1k-piece tokenizer for the generation tests."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.config import GLMConfig
from megatron_glm.data.tokenizers import GLMTokenizer, build_tokenizer
from megatron_glm.model import GLMModel, full_initial_value
from tests.tools.cli import REPO

TOKENIZER_MODEL = REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model"

# Prompts of different lengths and blank counts; "[gMASK]" ends one, another has no [eos].
PROMPTS = [
    "The list[MASK] is sorted in place.[sMASK] It returns None.",
    "Open the file[MASK] read it",
    "Modules[MASK] can import[MASK] other modules[gMASK]",
    "x[MASK]",
]


def tiny_config(**overrides: object) -> GLMConfig:
    """The tiny preset without dropout and with a wide initialisation, so that the random model's
    next-token distributions are peaked (no near-ties between its top tokens) and ``[eop]`` is
    chosen in some contexts."""
    values = {"hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.3}
    values.update(overrides)
    return GLMConfig.from_preset("tiny", **values)


@pytest.fixture(scope="session")
def tokenizer() -> GLMTokenizer:
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(TOKENIZER_MODEL))


def random_model(tokenizer: GLMTokenizer, tp_group: object = None) -> GLMModel:
    """The tiny random model (the same weights at every TP degree), nudged towards ``[eop]``:
    the final LayerNorm's bias gets 2.1 x the unit direction of ``[eop]``'s embedding, which
    raises its logit by about 2.1 x that embedding's norm (5, the logits' std is 2.4), so that
    some blanks end on ``[eop]`` (after 0 to 3 tokens) and others run to ``out_seq_length``."""
    config = tiny_config()
    model = GLMModel(config, tp_group).eval()
    table = full_initial_value("word_embeddings.weight", (config.padded_vocab_size, 64), config)
    eop = table[tokenizer.eop_id]
    with torch.no_grad():
        model.transformer.final_layernorm.bias += 2.1 * eop / eop.norm()
    return model


@pytest.fixture(scope="session")
def model(tokenizer: GLMTokenizer) -> GLMModel:
    return random_model(tokenizer)
