"""Throughput accounting and the log outputs (console, --log-json, TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from megatron_glm.config.model import GLMConfig
from megatron_glm.training.metrics import TrainLogger, device_peak_tflops, flops_per_token


def test_flops_per_token_matches_the_parameter_count() -> None:
    """Without the attention term, forward FLOPs per token are 2 x the matmul parameters."""
    config = GLMConfig.from_preset("large")
    h, L, V = config.hidden_size, config.num_layers, config.padded_vocab_size
    matmul_params = L * 12 * h * h + V * h
    attention = L * 4 * 512 * h
    assert flops_per_token(config, 512) == 3 * (2 * matmul_params + attention)


def test_peak_override_and_cpu() -> None:
    assert device_peak_tflops(123.0) == 123.0
    assert device_peak_tflops(None) is None  # CPU: no MFU unless given


def test_logger_writes_json_lines_and_tensorboard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = TrainLogger(
        rank=0,
        log_json=str(tmp_path / "sub" / "log.jsonl"),
        tensorboard_dir=str(tmp_path / "tb"),
        progress_bar=True,
        start_iteration=0,
        stop_iteration=2,
    )
    with caplog.at_level(logging.INFO, logger="megatron_glm.training.metrics"):
        log.log_train(
            {
                "step": 1,
                "loss": 1 / 3,
                "lr": 1e-4,
                "grad_norm": 0.5,
                "loss_scale": 4096.0,
                "skipped_steps": 1,
                "tokens_per_s": 10.0,
                "tflops": 1.0,
                "mfu": 0.5,
                "memory": {"max_rss_gib": 0.25},
            }
        )
        log.log_train({"step": 2, "loss": float("nan"), "lr": 1e-4, "grad_norm": None})
        log.log_eval(2, {"bert": 2.5, "all": 2.5}, {"bert": 10, "all": 10})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "sub" / "log.jsonl").read_text().splitlines()]
    assert float.fromhex(lines[0]["loss_hex"]) == lines[0]["loss"] == 1 / 3
    assert lines[1]["loss"] is None and math.isnan(float.fromhex(lines[1]["loss_hex"]))
    assert lines[2] == {
        "kind": "eval",
        "step": 2,
        "losses": {"bert": 2.5, "all": 2.5},
        "tokens": {"bert": 10, "all": 10},
    }
    assert "loss scale 4096" in caplog.text and "MFU 50.0%" in caplog.text
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_logger_is_silent_off_rank_zero(tmp_path: Path) -> None:
    log = TrainLogger(
        rank=1,
        log_json=str(tmp_path / "log.jsonl"),
        tensorboard_dir=None,
        progress_bar=True,
        start_iteration=0,
        stop_iteration=5,
    )
    log.log_train({"step": 1, "loss": 1.0, "lr": 1.0})
    log.close()
    assert not (tmp_path / "log.jsonl").exists()
