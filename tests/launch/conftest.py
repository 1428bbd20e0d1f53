"""Session fixtures of the launcher tests: a tiny tokenizer + corpus made with the real tools from
the bundled corpus, and a small fp32 DeepSpeed JSON."""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = REPO_ROOT / "data" / "python-docs-en.jsonl.gz"
NUM_DOCUMENTS = 60  # ~170k tokens: plenty for a few steps, seconds to tokenize


@dataclass(frozen=True)
class TinyCorpus:
    tokenizer_model: Path
    data_prefix: Path
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
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(self.tokenizer_model),
            "--data-path",
            str(self.data_prefix),
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


def _run_tool(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> TinyCorpus:
    root = tmp_path_factory.mktemp("launch_corpus")
    subset = root / "docs.jsonl"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as src, subset.open("w") as dst:
        dst.writelines(itertools.islice(src, NUM_DOCUMENTS))
    _run_tool(
        [
            "tools/train_tokenizer.py",
            "--input",
            str(subset),
            "--json-keys",
            "text",
            "--vocab-size",
            "1000",
            "--max-sentences",
            "20000",
            "--output-prefix",
            str(root / "sp1k"),
        ]
    )
    _run_tool(
        [
            "tools/preprocess_data.py",
            "--input",
            str(subset),
            "--json-keys",
            "text",
            "--append-eod",
            "--workers",
            "1",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(root / "sp1k.model"),
            "--output-prefix",
            str(root / "docs"),
        ]
    )
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
    return TinyCorpus(root / "sp1k.model", root / "docs_text_document", ds_config)
