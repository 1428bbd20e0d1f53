"""Fixtures of the task tests: the tiny corpus's tokenizer and a tiny model pretrained on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_glm.config.data import TokenizerSpec
from megatron_glm.data.tokenizers import GLMTokenizer, tokenizer_from_spec
from tests.training.helpers import Corpus, build_corpus, launch, write_ds_config

# hidden 64: at 32 the copy task of test_seq2seq needs several times more steps
MODEL_ARGS = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--max-position-embeddings",
    "64",
]
PRETRAIN_ITERS = 4


@pytest.fixture(scope="session")
def glm_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The tiny corpus of tests/training/helpers.py (one build per session, shared)."""
    return build_corpus(tmp_path_factory.getbasetemp() / "glm_corpus")


@pytest.fixture(scope="session")
def tokenizer(glm_corpus: Corpus) -> GLMTokenizer:
    spec = TokenizerSpec("SentencePieceTokenizer", tokenizer_model=str(glm_corpus.tokenizer_model))
    return tokenizer_from_spec(spec)


@pytest.fixture(scope="session")
def pretrained(glm_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny model after a few pretraining iterations on the corpus."""
    root = tmp_path_factory.mktemp("pretrained")
    ds = write_ds_config(root / "ds.json", train_batch=8, micro=8)
    args = [
        *MODEL_ARGS,
        *glm_corpus.data_args(),
        "--seq-length",
        "48",
        "--train-iters",
        str(PRETRAIN_ITERS),
        "--num-workers",
        "0",
        "--no-progress-bar",
        "--deepspeed_config",
        str(ds),
        "--save",
        str(root / "ckpt"),
    ]
    result = launch(1, args, log_dir=root)
    assert result.ok, result.describe()
    return root / "ckpt"
