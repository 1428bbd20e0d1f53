"""Every layout trains the same model on the same data to the same losses (docs/model.md#loss).

Each case launches ``pretrain_glm.py`` as real processes (gloo, torchrun-style variables): fp32,
dropout 0, 10 iterations, global batch 4, one objective (bert) so the data is identical however
the micro-batches are cut. Losses must agree with the single-process run within 1e-5 relative,
gradient norms within 1e-4 (DeepSpeed's ZeRO optimizers compute the norm their own way).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.training.helpers import Corpus, launch, pretrain_args, read_log, write_ds_config

ITERS = 10
GLOBAL_BATCH = 4
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4

# name -> (world size, extra flags, DeepSpeed batch/ZeRO settings)
LAYOUTS: dict[str, tuple[int, list[str], dict[str, Any]]] = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"], {"micro": 4}),
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"], {"micro": 4}),
    "pp2_gas4": (2, ["--pipeline-model-parallel-size", "2"], {"micro": 1, "gas": 4}),
    "dp2_recompute": (2, ["--checkpoint-activations"], {"micro": 2}),
    "tp2_pp2_recompute": (
        4,
        [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--checkpoint-activations",
        ],
        {"micro": 2, "gas": 2},
    ),
    "tp2_pp2_sp_recompute": (
        4,
        [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--sequence-parallel",
            "--checkpoint-activations",
        ],
        {"micro": 2, "gas": 2},
    ),
    "zero1_dp2": (2, [], {"micro": 2, "zero_stage": 1}),
    "zero2_dp2_gas2": (2, [], {"micro": 1, "gas": 2, "zero_stage": 2}),
    "zero3_dp2": (2, [], {"micro": 2, "zero_stage": 3}),
    "gas2": (1, [], {"micro": 2, "gas": 2}),
    # DeepSpeedCPUAdam (JIT-compiled once per machine, about 90 s on 2 cores, then cached)
    "zero2_offload": (1, [], {"micro": 4, "zero_stage": 2, "offload": True}),
}


def _args(corpus: Corpus, ds_config: Path, log: Path, extra: list[str]) -> list[str]:
    dropout_off = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    return pretrain_args(
        corpus, ds_config, log, iters=ITERS, bert_prob=1.0, extra=[*dropout_off, *extra]
    )


def _train(
    tmp: Path,
    corpus: Corpus,
    name: str,
    world_size: int,
    extra: list[str],
    micro: int,
    gas: int = 1,
    **ds: Any,
) -> list[dict[str, Any]]:
    tmp.mkdir(parents=True, exist_ok=True)
    config = write_ds_config(
        tmp / f"{name}.json", train_batch=GLOBAL_BATCH, micro=micro, gas=gas, **ds
    )
    log = tmp / f"{name}.jsonl"
    result = launch(world_size, _args(corpus, config, log, extra), log_dir=tmp)
    assert result.ok, result.describe()
    records = read_log(log)
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    return records


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, glm_corpus: Corpus) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("layouts")
    records = _train(tmp, glm_corpus, "base", 1, ["--tensorboard-dir", str(tmp / "tb")], micro=4)
    return {"records": records, "tmp": tmp}


def _assert_same(records: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    for got, want in zip(records, reference, strict=True):
        step = want["step"]
        assert math.isclose(got["loss"], want["loss"], rel_tol=LOSS_RTOL), (step, got, want)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12), step
        assert got["grad_norm"] is not None and want["grad_norm"] is not None
        assert math.isclose(got["grad_norm"], want["grad_norm"], rel_tol=NORM_RTOL), (
            step,
            got["grad_norm"],
            want["grad_norm"],
        )


def test_baseline_trains_and_logs(baseline: dict[str, Any]) -> None:
    records = baseline["records"]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["consumed_samples"] == ITERS * GLOBAL_BATCH
    assert all(r["tokens_per_s"] > 0 and r["skipped_steps"] == 0 for r in records)
    # exact float in the JSON: the hex form round-trips to the logged value
    assert all(float.fromhex(r["loss_hex"]) == r["loss"] for r in records)
    assert list((baseline["tmp"] / "tb").glob("events.out.tfevents.*")), "no TensorBoard events"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_single_process(
    name: str, baseline: dict[str, Any], glm_corpus: Corpus
) -> None:
    world_size, extra, ds = LAYOUTS[name]
    records = _train(baseline["tmp"], glm_corpus, name, world_size, extra, **ds)
    _assert_same(records, baseline["records"])


def test_micro_batch_normalisation_differs(baseline: dict[str, Any], glm_corpus: Corpus) -> None:
    """The official per-micro-batch mean is a different loss whenever micro-batches hold
    different numbers of loss tokens: the comparison above can tell normalisations apart."""
    records = _train(
        baseline["tmp"],
        glm_corpus,
        "dp2_microbatch_norm",
        2,
        ["--loss-normalization", "micro-batch"],
        micro=2,
    )
    first, want = records[0]["loss"], baseline["records"][0]["loss"]
    assert math.isfinite(first)
    assert not math.isclose(first, want, rel_tol=LOSS_RTOL), (first, want)


def test_bf16_converges(baseline: dict[str, Any], glm_corpus: Corpus) -> None:
    records = _train(baseline["tmp"], glm_corpus, "bf16", 1, [], micro=4, bf16=True, lr=3e-3)
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
