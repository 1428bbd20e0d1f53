"""Tests of the checkpoint forms (megatron_glm/conversion) and tools/convert_checkpoint.py.

``trained_checkpoints(base)`` makes megatron_glm training checkpoints with the real trainer (two
iterations of the tiny model at TP 2 x PP 2 and at TP 2 x PP 1, on the tiny corpus of
tests/training) once per pytest session: it keeps them under ``base`` (the session's base
temporary directory) with a ``DONE`` marker, so every test module that needs them shares the two
launches. Tests copy them before damaging them.

``zero3_checkpoint(base)`` does the same for a TP 2 run at ZeRO stage 3 in bf16 (2 processes),
whose DeepSpeed module files hold no weights; ``record_final_weights`` (a ``MEGATRON_GLM_HOOKS``
target) saves each rank's module weights after every iteration, gathered from ZeRO 3's
partitions, as the reference for what the checkpoint holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.training.helpers import Corpus, build_corpus, launch, pretrain_args, write_ds_config

ITERATIONS = 2


@dataclass(frozen=True)
class TrainedCheckpoints:
    corpus: Corpus
    tp2_pp2: Path  # the --save directory of a TP 2 x PP 2 run (4 processes)
    tp2_pp1: Path  # the --save directory of a TP 2 x PP 1 run (2 processes)


def _train(
    corpus: Corpus,
    root: Path,
    tp: int,
    pp: int,
    zero_stage: int = 0,
    bf16: bool = False,
    env: dict[str, str] | None = None,
) -> Path:
    name = (
        f"tp{tp}_pp{pp}" + (f"_zero{zero_stage}" if zero_stage else "") + ("_bf16" if bf16 else "")
    )
    save = root / name
    done = root / f"{name}.DONE"
    if done.exists():
        return save
    ds = write_ds_config(
        root / f"ds_{name}.json", train_batch=2, micro=1, zero_stage=zero_stage, bf16=bf16
    )
    args = pretrain_args(
        corpus,
        ds,
        root / f"log_{name}.jsonl",
        iters=ITERATIONS,
        bert_prob=0.5,
        extra=[
            "--tensor-model-parallel-size",
            str(tp),
            "--pipeline-model-parallel-size",
            str(pp),
            "--save",
            str(save),
        ],
    )
    result = launch(tp * pp, args, log_dir=root / "logs", env=env)
    if not result.ok:
        raise RuntimeError(f"training the {name} source failed:\n{result.describe()}")
    done.write_text("ok\n")
    return save


def trained_checkpoints(base: Path) -> TrainedCheckpoints:
    corpus = build_corpus(base / "glm_corpus")  # the corpus tests/training builds, shared
    root = base / "conversion_sources"
    root.mkdir(parents=True, exist_ok=True)
    return TrainedCheckpoints(corpus, _train(corpus, root, 2, 2), _train(corpus, root, 2, 1))


WEIGHTS_ENV = "CONVERSION_TEST_WEIGHTS"


@dataclass(frozen=True)
class Zero3Checkpoint:
    save: Path  # the --save directory of a TP 2 run at ZeRO 3 in bf16 (2 processes)
    weights: list[Path]  # TP rank r's module weights after the last iteration (safetensors)


def zero3_checkpoint(base: Path) -> Zero3Checkpoint:
    corpus = build_corpus(base / "glm_corpus")
    root = base / "conversion_sources"
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / "zero3_weights"
    hook = {"MEGATRON_GLM_HOOKS": f"{__name__}:record_final_weights", WEIGHTS_ENV: str(prefix)}
    save = _train(corpus, root, 2, 1, zero_stage=3, bf16=True, env=hook)
    return Zero3Checkpoint(save, [Path(f"{prefix}.rank{r}.safetensors") for r in range(2)])


def record_final_weights(hooks: Any) -> None:
    """After every iteration, save this rank's module weights (ZeRO 3: gathered over data
    parallelism, as the forward pass sees them) to ``$CONVERSION_TEST_WEIGHTS.rank<r>.safetensors``."""
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_glm.training.engine import Trainer

    path = f"{os.environ[WEIGHTS_ENV]}.rank{dist.get_rank()}.safetensors"
    train_step = Trainer.train_step

    def recording_step(self: Trainer, micro_batches: Any) -> Any:
        stats = train_step(self, micro_batches)
        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            tensors = {n: p.detach().clone() for n, p in module.named_parameters()}
        save_file(tensors, path)
        return stats

    Trainer.train_step = recording_step  # type: ignore[method-assign]
