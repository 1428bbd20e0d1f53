"""Completing and checking the DeepSpeed JSON (megatron_glm.training.ds_config)."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_glm.training.ds_config import resolve_ds_config

ADAM = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}


def _resolve(
    dp: int = 2,
    pp: int = 1,
    cuda: bool = False,
    cli_lr: float | None = None,
    cpu_fp16: bool = False,
    **cfg: Any,
) -> Any:
    return resolve_ds_config(
        {"optimizer": ADAM, **cfg},
        data_parallel_size=dp,
        pipeline_parallel_size=pp,
        cli_lr=cli_lr,
        cuda=cuda,
        cpu_fp16=cpu_fp16,
    )


@pytest.mark.parametrize(
    "given, expected",
    [
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, (16, 2, 4)),
        ({"train_batch_size": 16, "gradient_accumulation_steps": 2}, (16, 4, 2)),
        ({"train_batch_size": 16}, (16, 8, 1)),
        ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, (12, 3, 2)),
        ({"train_micro_batch_size_per_gpu": 3}, (6, 3, 1)),
        (
            {
                "train_batch_size": 12,
                "train_micro_batch_size_per_gpu": 3,
                "gradient_accumulation_steps": 2,
            },
            (12, 3, 2),
        ),
    ],
)
def test_batch_triple_is_completed(given: dict[str, int], expected: tuple[int, int, int]) -> None:
    resolved, problems = _resolve(**given)
    assert problems == []
    got = (
        resolved.train_batch_size,
        resolved.micro_batch_size,
        resolved.gradient_accumulation_steps,
    )
    assert got == expected
    assert (
        resolved.config["train_batch_size"],
        resolved.config["train_micro_batch_size_per_gpu"],
        resolved.config["gradient_accumulation_steps"],
    ) == expected


@pytest.mark.parametrize(
    "given",
    [
        {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 4},  # 12 % (4 * 2)
        {
            "train_batch_size": 10,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 2,
        },
        {"train_batch_size": 6, "gradient_accumulation_steps": 2},
        {"gradient_accumulation_steps": 2},
        {"train_batch_size": -4},
    ],
)
def test_bad_batch_arithmetic(given: dict[str, int]) -> None:
    resolved, problems = _resolve(**given)
    assert resolved is None and len(problems) == 1, problems


def test_learning_rate_rule() -> None:
    resolved, _ = _resolve(train_batch_size=4)
    assert resolved.peak_lr == 1e-3 and resolved.weight_decay == 0.01
    resolved, _ = _resolve(train_batch_size=4, cli_lr=1e-3)  # same value twice is fine
    assert resolved.peak_lr == 1e-3
    no_lr = {"type": "AdamW", "params": {}}
    resolved, problems = resolve_ds_config(
        {"optimizer": no_lr, "train_batch_size": 4},
        data_parallel_size=1,
        pipeline_parallel_size=1,
        cli_lr=5e-4,
        cuda=False,
    )
    assert problems == [] and resolved.config["optimizer"]["params"]["lr"] == 5e-4
    _, problems = _resolve(train_batch_size=4, cli_lr=2e-3)
    assert problems and "disagree" in problems[0]


def test_zero_precision_and_offload_rules() -> None:
    for stage in (2, 3):
        _, problems = _resolve(train_batch_size=4, pp=2, zero_optimization={"stage": stage})
        assert any("PipelineEngine supports ZeRO stages 0 and 1" in p for p in problems)
    resolved, problems = _resolve(train_batch_size=4, pp=2, zero_optimization={"stage": 1})
    assert problems == [] and resolved.zero_stage == 1
    _, problems = _resolve(train_batch_size=4, fp16={"enabled": True}, bf16={"enabled": True})
    assert any("both fp16 and bf16" in p for p in problems)
    _, problems = _resolve(train_batch_size=4, fp16={"enabled": True})
    assert any("Type fp16 is not supported on your device" in p for p in problems)
    # a CPU with native fp16 (DeepSpeed's CPU accelerator accepts it there)
    zero1 = {"stage": 1}
    resolved, problems = _resolve(
        train_batch_size=4, cpu_fp16=True, fp16={"enabled": True}, zero_optimization=zero1
    )
    assert problems == [] and resolved.precision == "fp16"
    # the official Base/Large JSONs: fp16 at stage 0 (the trainer scales the loss DeepSpeed
    # forgets there, tests/training/test_fp16.py)
    resolved, problems = _resolve(
        train_batch_size=4, cuda=True, fp16={"enabled": True}, zero_optimization={"stage": 0}
    )
    assert problems == [] and (resolved.precision, resolved.zero_stage) == ("fp16", 0)
    resolved, problems = _resolve(
        train_batch_size=4, cuda=True, fp16={"enabled": True}, zero_optimization=zero1
    )
    assert problems == [] and resolved.precision == "fp16"
    assert "torch_adam" not in resolved.config["optimizer"]["params"]  # CUDA: FusedAdam
    resolved, problems = _resolve(
        train_batch_size=4, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}
    )
    assert problems == [] and resolved.offload_optimizer
    assert "torch_adam" not in resolved.config["optimizer"]["params"]  # DeepSpeedCPUAdam
    _, problems = _resolve(
        train_batch_size=4, zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}
    )
    assert any("offload_optimizer needs ZeRO" in p for p in problems)
