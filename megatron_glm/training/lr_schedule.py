"""The GLM learning-rate schedule as a torch LR scheduler handed to DeepSpeed.

Flags and formulas: docs/training.md#iterations-learning-rate-loss; the released recipes' values:
docs/blank-infilling.md#released-recipes.

Iteration ``i`` (1-based: the ``i``-th optimizer update) uses ``glm_learning_rate(i, ...)``:

- warmup, ``i <= W``: ``peak * i / W`` (linear from 0, so the first update is already non-zero);
- decay, ``t = min(1, (i - W) / (D - W))``:
  cosine ``peak * (r + (1 - r) * (1 + cos(pi * t)) / 2)``, linear ``peak * (1 - (1 - r) * t)``,
  constant ``peak``;
- flat at ``r * peak`` after ``D`` (``D`` = ``--lr-decay-iters``, default ``--train-iters``).

DeepSpeed calls ``step()`` after every applied update and skips it when fp16 overflow skips the
update, so the schedule follows applied updates (as in Megatron).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_glm.config.training import LR_DECAY_STYLES


def glm_learning_rate(
    iteration: int,
    *,
    peak_lr: float,
    warmup_iters: int,
    decay_iters: int,
    decay_style: str,
    final_ratio: float,
) -> float:
    """Learning rate of update number ``iteration`` (1-based); see the module docstring."""
    if decay_style not in LR_DECAY_STYLES:
        raise ValueError(f"decay_style must be one of {LR_DECAY_STYLES}, got {decay_style!r}")
    if warmup_iters > 0 and iteration <= warmup_iters:
        return peak_lr * iteration / warmup_iters
    if decay_style == "constant":
        return peak_lr
    decay_span = decay_iters - warmup_iters
    t = 1.0 if decay_span <= 0 else min(1.0, max(0.0, (iteration - warmup_iters) / decay_span))
    if decay_style == "cosine":
        return peak_lr * (final_ratio + (1.0 - final_ratio) * (1.0 + math.cos(math.pi * t)) / 2.0)
    return peak_lr * (1.0 - (1.0 - final_ratio) * t)


class GLMLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Sets every parameter group's ``lr`` to ``glm_learning_rate(last_epoch + 1)``.

    ``last_epoch`` counts the updates applied so far (0 after construction), so the LR in the
    optimizer is always the one the *next* update uses. ``state_dict()`` holds that count and the
    schedule parameters; DeepSpeed saves and restores it with the checkpoint.
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        peak_lr: float,
        warmup_iters: int,
        decay_iters: int,
        decay_style: str,
        final_ratio: float,
        last_epoch: int = -1,
    ) -> None:
        if decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"decay_style must be one of {LR_DECAY_STYLES}, got {decay_style!r}")
        if not peak_lr > 0 or warmup_iters < 0 or decay_iters < 0 or not 0 <= final_ratio <= 1:
            raise ValueError(
                f"bad schedule: peak_lr={peak_lr}, warmup_iters={warmup_iters}, "
                f"decay_iters={decay_iters}, final_ratio={final_ratio}"
            )
        self.peak_lr = peak_lr
        self.warmup_iters = warmup_iters
        self.decay_iters = decay_iters
        self.decay_style = decay_style
        self.final_ratio = final_ratio
        # DeepSpeed hands us its wrapper (ZeRO / bf16 optimizers) which is not a torch Optimizer
        # subclass but exposes the wrapped optimizer's param_groups; LRScheduler only needs those.
        super().__init__(_ParamGroupsView.wrap(optimizer), last_epoch)

    def lr_at(self, iteration: int) -> float:
        return glm_learning_rate(
            iteration,
            peak_lr=self.peak_lr,
            warmup_iters=self.warmup_iters,
            decay_iters=self.decay_iters,
            decay_style=self.decay_style,
            final_ratio=self.final_ratio,
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr = self.lr_at(self.last_epoch + 1)
        return [lr for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}


class _ParamGroupsView(torch.optim.Optimizer):
    """A torch ``Optimizer`` facade over any object with ``param_groups`` (never steps)."""

    def __init__(self, inner: Any) -> None:  # noqa: D107 - deliberately skips Optimizer.__init__
        self.inner = inner
        self.defaults = {}
        self.state = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def _opt_called(self) -> bool:
        # the wrapper steps the real optimizer itself; silences torch's order-of-calls warning
        return True

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        pass

    @staticmethod
    def wrap(optimizer: Any) -> torch.optim.Optimizer:
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} has no param_groups")
        return _ParamGroupsView(optimizer)

    def step(self, closure: Any = None) -> None:  # pragma: no cover - never called
        raise RuntimeError("_ParamGroupsView only carries param_groups for the LR scheduler")
