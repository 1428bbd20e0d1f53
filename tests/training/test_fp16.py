"""fp16 with DeepSpeed's dynamic loss scaling: overflowing steps are skipped, counted and halve the
scale; the model does not change on a skipped step; training then proceeds.

DeepSpeed 0.19.8 refuses fp16 on a CPU without native fp16 ("Type fp16 is not supported on your
device."), and so does our configuration check (tested below). The training test simulates a CPU
with native fp16 (``fp16_hooks.simulate_cpu_fp16``: only DeepSpeed's capability query changes;
the parameters are fp16 and the forward/backward run in torch's CPU fp16 kernels).

ZeRO stage 1 on purpose: under ZeRO stage 0, DeepSpeed 0.19.8's ``engine.backward`` does not
apply the loss scale for its non-ZeRO fp16 optimizers (``FP16_Optimizer`` /
``FP16_UnfusedOptimizer``), so overflow is never seen and every update is divided by the scale
(see docs/training.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from megatron_glm.training.arguments import ConfigError, parse_run_config
from tests.training.helpers import (
    REPO,
    Corpus,
    launch,
    pretrain_args,
    read_log,
    write_ds_config,
)

ITERS = 12
INITIAL_SCALE_POWER = 20  # 2**20: the tiny model's fp16 gradients overflow until about 2**16


def _fp16_config(path: Path, scale_power: int = INITIAL_SCALE_POWER) -> Path:
    return write_ds_config(
        path,
        train_batch=4,
        micro=4,
        zero_stage=1,
        lr=2e-3,
        # hysteresis 1: every overflow halves the scale (DeepSpeed's default 2 lets the first
        # overflow after a good stretch pass without lowering it)
        fp16={
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": scale_power,
            "hysteresis": 1,
        },
    )


def test_fp16_refused_on_cpu_without_native_fp16(tmp_path: Path, glm_corpus: Corpus) -> None:
    import torch

    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU has native fp16: DeepSpeed accepts fp16 here")
    config = _fp16_config(tmp_path / "ds.json")
    argv = pretrain_args(glm_corpus, config, tmp_path / "log.jsonl", iters=1, bert_prob=1.0)
    with pytest.raises(ConfigError) as err:
        parse_run_config(argv, 1, cuda=False)
    assert "Type fp16 is not supported on your device" in str(err.value)


def _param_log(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_fp16_overflow_skips_then_trains(tmp_path: Path, glm_corpus: Corpus) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from tests.training.fp16_hooks import simulate_cpu_fp16\nsimulate_cpu_fp16()\n"
    )
    log = tmp_path / "log.jsonl"
    args = pretrain_args(
        glm_corpus,
        _fp16_config(tmp_path / "ds.json"),
        log,
        iters=ITERS,
        bert_prob=1.0,
        extra=["--hidden-dropout", "0", "--attention-dropout", "0"],
    )
    env = {
        "PYTHONPATH": f"{REPO}:{site}",
        "MEGATRON_GLM_HOOKS": "tests.training.fp16_hooks:record_params",
        "FP16_PARAM_LOG": str(tmp_path / "params"),
    }
    result = launch(1, args, env=env, log_dir=tmp_path)
    assert result.ok, result.describe()
    records = read_log(log)
    params = _param_log(tmp_path / "params.rank0")
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    assert [p["iteration"] for p in params] == list(range(1, ITERS + 1))
    assert params[0]["dtypes"] == ["torch.float16"], "the model does not run in fp16"

    skipped = [r["skipped_steps"] for r in records]
    scales = [r["loss_scale"] for r in records]
    assert skipped[0] == 1, "2**20 should overflow on the first step"
    assert 0 < skipped[-1] < ITERS - 4, skipped  # some skips, then enough applied updates
    prev_skipped, prev_scale = 0, 2.0**INITIAL_SCALE_POWER
    prev_digest = None
    for rec, par in zip(records, params, strict=True):
        step = rec["step"]
        did_skip = rec["skipped_steps"] - prev_skipped
        assert did_skip in (0, 1), (step, skipped)
        if did_skip:
            assert rec["loss_scale"] == prev_scale / 2, (step, scales)
            assert rec["grad_norm"] is None, step  # DeepSpeed computes no norm for a skipped step
            if prev_digest is not None:
                assert par["digest"] == prev_digest, f"parameters changed on skipped step {step}"
        else:
            assert rec["loss_scale"] == prev_scale, (step, scales)  # no growth within 1000 steps
            assert par["digest"] != prev_digest, f"parameters unchanged on applied step {step}"
            assert rec["grad_norm"] is not None and math.isfinite(rec["grad_norm"]), step
        prev_skipped, prev_scale, prev_digest = (
            rec["skipped_steps"],
            rec["loss_scale"],
            par["digest"],
        )
    # the LR schedule advances only on applied updates (warmup, then cosine: it always moves)
    lrs = [r["lr"] for r in records]
    for k in range(ITERS - 1):
        applied = skipped[k] == (skipped[k - 1] if k else 0)
        assert (lrs[k + 1] != lrs[k]) == applied, (k + 1, lrs, skipped)
    first_applied = next(k for k in range(ITERS) if skipped[k] == (skipped[k - 1] if k else 0))

    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[first_applied] - 0.1, losses
