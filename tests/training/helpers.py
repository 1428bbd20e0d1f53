"""Test helpers for the trainer: a tiny corpus and a launcher of ``pretrain_glm.py`` processes.

``build_corpus(root)`` trains a 512-piece sentencepiece tokenizer on a sample of the bundled
``data/python-docs-en.jsonl.gz`` and tokenizes its first 60 documents with ``tools/`` (about 10 s),
once per pytest session (the ``glm_corpus`` fixture; tests/launch builds a 1000-piece one). ``launch(world_size, args)`` starts ``world_size``
processes of ``pretrain_glm.py`` with the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), kills them all on timeout, and returns exit codes and output.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.distributed.harness import find_free_port
from tests.tools.cli import REPO, check_tool

CORPUS = REPO / "data" / "python-docs-en.jsonl.gz"
NUM_DOCS = 60


@dataclass(frozen=True)
class Corpus:
    tokenizer_model: Path
    data_prefix: Path

    def data_args(self) -> list[str]:
        return [
            "--data-path",
            str(self.data_prefix),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            str(self.tokenizer_model),
        ]


def build_corpus(root: Path, *, vocab_size: int = 512, max_sentences: int = 5000) -> Corpus:
    """Build (or reuse, when a previous call completed) the tiny corpus under ``root``: a
    ``vocab_size``-piece sentencepiece model trained on at most ``max_sentences`` sentences of the
    first ``NUM_DOCS`` documents, and those documents tokenized with ``--append-eod``."""
    done = root / "DONE"
    corpus = Corpus(root / f"sp{vocab_size}.model", root / "pydocs_text_document")
    if done.exists():
        return corpus
    root.mkdir(parents=True, exist_ok=True)
    subset = root / "subset.jsonl"
    with (
        gzip.open(CORPUS, "rt", encoding="utf-8") as src,
        open(subset, "w", encoding="utf-8") as dst,
    ):
        for _, line in zip(range(NUM_DOCS), src):
            dst.write(line)
    check_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(subset),
        "--vocab-size",
        str(vocab_size),
        "--max-sentences",
        str(max_sentences),
        "--output-prefix",
        str(root / f"sp{vocab_size}"),
    )
    check_tool(
        "tools/preprocess_data.py",
        "--input",
        str(subset),
        "--output-prefix",
        str(root / "pydocs"),
        "--append-eod",
        "--workers",
        "1",
        "--no-progress",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(corpus.tokenizer_model),
    )
    done.write_text("ok\n")
    return corpus


def tiny_model_args(seq_length: int = 64) -> list[str]:
    return [
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--seq-length",
        str(seq_length),
        "--max-position-embeddings",
        str(seq_length),
    ]


def pretrain_args(
    corpus: Corpus,
    ds_config: Path,
    log: Path,
    *,
    iters: int,
    bert_prob: float,
    extra: Sequence[str] = (),
) -> list[str]:
    """``pretrain_glm.py`` flags of the multi-process trainer tests: the tiny model on ``corpus``
    for ``iters`` iterations, a ``--log-json`` record per iteration in ``log``, no data workers, no
    progress bar; ``extra`` comes last."""
    return [
        *tiny_model_args(),
        *corpus.data_args(),
        "--train-iters",
        str(iters),
        "--warmup",
        "0.2",
        "--log-interval",
        "1",
        "--bert-prob",
        str(bert_prob),
        "--num-workers",
        "0",
        "--no-progress-bar",
        "--deepspeed_config",
        str(ds_config),
        "--log-json",
        str(log),
        *extra,
    ]


def write_ds_config(
    path: Path,
    *,
    train_batch: int,
    micro: int,
    gas: int | None = None,
    zero_stage: int = 0,
    bf16: bool = False,
    lr: float = 1e-3,
    clipping: float = 1.0,
    **extra: Any,
) -> Path:
    cfg: dict[str, Any] = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.1},
        },
        "gradient_clipping": clipping,
        "zero_optimization": {"stage": zero_stage},
    }
    if gas is not None:
        cfg["gradient_accumulation_steps"] = gas
    if bf16:
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return path


@dataclass
class LaunchResult:
    returncodes: list[int]
    outputs: list[str]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def describe(self) -> str:
        return "\n".join(
            f"--- rank {r} exit {rc} ---\n{out[-6000:]}"
            for r, (rc, out) in enumerate(zip(self.returncodes, self.outputs))
        )


def launch(
    world_size: int,
    args: list[str],
    *,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    script: str = "pretrain_glm.py",
) -> LaunchResult:
    """Run ``script args`` (``pretrain_glm.py``, ``finetune_glm.py``) as ``world_size`` ranks on
    this host (gloo)."""
    port = find_free_port()
    base = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "PYTHONPATH": str(REPO),
    }
    base.update(env or {})
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for rank in range(world_size):
        f = open(log_dir / f"rank{rank}-{port}.log", "w+", encoding="utf-8")  # noqa: SIM115
        files.append(f)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / script), *args],
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
        )
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * world_size
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                codes[i] = p.poll()
            if any(c not in (None, 0) for c in codes) and any(c is None for c in codes):
                # one rank failed; give the others a moment to fail too, then stop them
                time.sleep(5.0)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
                codes[i] = -9 if codes[i] is None else codes[i]
            codes[i] = p.returncode
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    return LaunchResult([int(c) for c in codes], outputs)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The ``kind == "train"`` records of a ``--log-json`` file."""
    with open(path, encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]
