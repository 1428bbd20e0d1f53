"""Session fixtures of the launcher tests: a tiny tokenizer + corpus made with the real tools from
the bundled corpus, and a small fp32 DeepSpeed JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.training.helpers import Corpus, build_corpus


@dataclass(frozen=True)
class TinyCorpus(Corpus):
    ds_config: Path

    def trainer_args(self, workdir: Path, train_iters: int = 4) -> list[str]:
        """pretrain_glm.py flags for a tiny 2-rank data-parallel run writing into ``workdir``."""
        return [
            "--num-layers",
            "2",
            "--hidden-size",
            "64",
            "--num-attention-heads",
            "4",
            "--seq-length",
            "64",
            "--max-position-embeddings",
            "64",
            *self.data_args(),
            "--split",
            "98,2,0",
            "--num-workers",
            "0",
            "--data-cache-dir",
            str(workdir / "index_cache"),
            "--train-iters",
            str(train_iters),
            "--lr",
            "1e-3",
            "--warmup",
            "0.0",
            "--log-interval",
            "1",
            "--log-json",
            str(workdir / "log.jsonl"),
            "--no-progress-bar",
            "--seed",
            "1234",
            "--deepspeed",
            "--deepspeed_config",
            str(self.ds_config),
        ]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    root = tmp_path_factory.mktemp("launch_corpus")
    corpus = build_corpus(root, vocab_size=1000, max_sentences=20000)
    ds_config = root / "ds_config.json"
    ds_config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "optimizer": {
                    "type": "AdamW",
                    "params": {"betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1},
                },
            }
        )
    )
    return TinyCorpus(corpus.tokenizer_model, corpus.data_prefix, ds_config)
