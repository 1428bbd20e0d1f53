"""The GLM LR schedule (docs/training.md#iterations-learning-rate-loss) and its torch scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm.config.training import TrainingConfig
from megatron_glm.training.lr_schedule import GLMLRScheduler, glm_learning_rate


def _lr(i: int, style: str, r: float = 0.1) -> float:
    return glm_learning_rate(
        i, peak_lr=2.0, warmup_iters=4, decay_iters=14, decay_style=style, final_ratio=r
    )


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_is_linear_from_zero(style: str) -> None:
    assert [_lr(i, style) for i in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_cosine_and_linear_decay_formulas() -> None:
    for i in range(4, 15):
        t = (i - 4) / 10
        assert _lr(i, "cosine") == pytest.approx(
            2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2)
        )
        assert _lr(i, "linear") == pytest.approx(2.0 * (1 - 0.9 * t))
        assert _lr(i, "constant") == 2.0
    # flat at the final ratio after the decay iterations
    assert _lr(15, "cosine") == _lr(100, "cosine") == pytest.approx(0.2)
    assert _lr(100, "linear") == pytest.approx(0.2)


def test_scheduler_sets_the_next_updates_lr_and_round_trips() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param, torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    kwargs = dict(
        peak_lr=2.0, warmup_iters=4, decay_iters=14, decay_style="cosine", final_ratio=0.1
    )
    sched = GLMLRScheduler(opt, **kwargs)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [_lr(i, "cosine") for i in range(1, 7)]
    assert all(g["lr"] == _lr(7, "cosine") for g in opt.param_groups)

    state = sched.state_dict()
    fresh_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = GLMLRScheduler(fresh_opt, **kwargs)
    fresh.load_state_dict(state)
    fresh_opt.step()
    fresh.step()
    assert fresh_opt.param_groups[0]["lr"] == _lr(8, "cosine")


def test_scheduler_accepts_deepspeed_style_wrappers() -> None:
    """DeepSpeed hands the scheduler factory its optimizer wrapper (not a torch Optimizer)."""
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    class Wrapper:
        @property
        def param_groups(self) -> list[dict]:
            return inner.param_groups

    sched = GLMLRScheduler(
        Wrapper(), peak_lr=1.0, warmup_iters=2, decay_iters=4, decay_style="linear", final_ratio=0.5
    )
    assert inner.param_groups[0]["lr"] == 0.5
    sched.step()
    assert inner.param_groups[0]["lr"] == 1.0


def test_training_config_schedule_quantities() -> None:
    t = TrainingConfig(train_iters=1000, lr_decay_iters=800, warmup=0.05, lr=4e-4, min_lr=4e-5)
    assert (t.decay_iters, t.warmup_iters) == (800, 40)
    assert t.final_lr_ratio(4e-4) == pytest.approx(0.1)
    assert TrainingConfig(train_iters=10, lr_decay_ratio=0.05).final_lr_ratio(1.0) == 0.05


def test_exit_interval_stops_at_its_next_multiple() -> None:
    t = TrainingConfig(train_iters=10, exit_interval=4)
    assert [t.stop_iteration(s) for s in (0, 3, 4, 7, 8, 9)] == [4, 4, 8, 8, 10, 10]
    assert TrainingConfig(train_iters=10).stop_iteration(3) == 10


def test_training_config_lists_every_problem() -> None:
    with pytest.raises(ValueError) as info:
        TrainingConfig(
            train_iters=0,
            lr_decay_style="exp",
            warmup=2.0,
            save_interval=5,
            loss_normalization="token",
        )
    message = str(info.value)
    for needle in (
        "train_iters",
        "lr_decay_style",
        "warmup",
        "save_interval",
        "loss_normalization",
    ):
        assert needle in message
