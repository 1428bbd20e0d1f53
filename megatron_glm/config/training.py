"""Training configuration: layout, iterations, LR schedule, loss normalisation, checkpoints, logging.

Batch sizes, the optimizer, ZeRO and precision live in the DeepSpeed JSON (``--deepspeed_config``);
``megatron_glm.training.ds_config`` reads and checks it. Everything here is validated at once:
``TrainingConfig.problems()`` lists every mistake, ``__post_init__`` raises them as one
``ValueError``, so the CLI can report all problems of a command line together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

LR_DECAY_STYLES = ("cosine", "linear", "constant")
LOSS_NORMALIZATIONS = ("global", "micro-batch")


@dataclass
class TrainingConfig:
    """What ``pretrain_glm.py`` does besides the model and the data.

    LR schedule (docs/training.md): linear warmup from 0 over ``warmup_iters``, then decay to
    ``final_lr_ratio * lr`` at ``decay_iters``, flat after. ``warmup`` is the official GLM's fraction
    of the decay iterations; ``lr_warmup_iters`` (Megatron's flag) gives the length directly. The final ratio is ``min_lr / lr`` when ``min_lr`` is given (Megatron's
    flag), else ``lr_decay_ratio`` (the official GLM's flag).
    """

    # layout (the data-parallel degree follows from the world size)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # iterations
    train_iters: int = 1000
    exit_interval: int | None = None  # stop (after saving) at the next multiple of this
    # learning-rate schedule; lr None = take optimizer.params.lr from the DeepSpeed JSON
    lr: float | None = None
    min_lr: float | None = None
    lr_decay_ratio: float = 0.1
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None  # None: train_iters
    warmup: float = 0.01
    lr_warmup_iters: int | None = None  # overrides warmup
    # docs/training.md: "global" = mean over every loss token of the global batch; "micro-batch" =
    # the official per-micro-batch mean, averaged over micro-batches and data-parallel ranks
    loss_normalization: str = "global"
    # checkpoints
    save: str | None = None
    load: str | None = None
    # initialise the model from these weights (any checkpoint form, any source layout) and nothing
    # else; a checkpoint found under ``load`` takes precedence (a relaunch resumes)
    load_pretrained: str | None = None
    save_interval: int | None = None
    keep_last_k: int | None = None  # None: keep every checkpoint
    # also save the layout-free state (fp32 weights + Adam moments under canonical names) that a
    # resume on another TP/PP/DP/ZeRO layout needs; about 12 extra bytes per parameter
    save_layout_free: bool = True
    load_rng: bool = True  # False (--no-load-rng): resume without the saved RNG streams
    load_optim: bool = True  # False (--no-load-optim): resume without the optimizer state
    load_lr_scheduler: bool = True  # False (--no-load-lr-scheduler): the schedule restarts
    # checkpoint verification on resume (docs/checkpoints.md#integrity): the newest older checkpoint
    # that verifies instead of an error (--load-fallback); the SHA-256 digests (off: sizes only)
    load_fallback: bool = False
    verify_checkpoint_hashes: bool = True
    # torch.distributed backend; None: nccl with CUDA, else gloo
    distributed_backend: str | None = None
    # validation
    eval_interval: int | None = None  # None: no periodic validation
    eval_iters: int = 10  # global batches per validation
    # logging
    log_interval: int = 10
    log_json: str | None = None
    tensorboard_dir: str | None = None
    progress_bar: bool = True
    peak_tflops: float | None = None  # per device, for the MFU estimate; None = known GPUs only
    # weight init, dropout streams and data order all derive from the seed
    seed: int = 1234

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid training configuration:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency of this configuration, as messages naming the offending values."""
        out: list[str] = []

        def positive_int(name: str, allow_none: bool = False) -> bool:
            value = getattr(self, name)
            if value is None and allow_none:
                return True
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(f"{name} must be a positive integer, got {value!r}")
                return False
            return True

        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "train_iters",
            "eval_iters",
            "log_interval",
        ):
            positive_int(name)
        for name in (
            "exit_interval",
            "lr_decay_iters",
            "save_interval",
            "keep_last_k",
            "eval_interval",
        ):
            positive_int(name, allow_none=True)
        if not isinstance(self.seed, int) or self.seed < 0:
            out.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            out.append(f"lr must be a positive number, got {self.lr}")
        if self.min_lr is not None:
            if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
                out.append(f"min_lr must be >= 0, got {self.min_lr}")
            elif self.lr is not None and self.min_lr > self.lr:
                out.append(f"min_lr ({self.min_lr}) is larger than lr ({self.lr})")
        if not 0.0 <= self.lr_decay_ratio <= 1.0:
            out.append(f"lr_decay_ratio must be in [0, 1], got {self.lr_decay_ratio}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            out.append(
                f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}"
            )
        if self.lr_warmup_iters is not None and (
            not isinstance(self.lr_warmup_iters, int) or self.lr_warmup_iters < 0
        ):
            out.append(f"lr_warmup_iters must be an integer >= 0, got {self.lr_warmup_iters!r}")
        if not 0.0 <= self.warmup <= 1.0:
            out.append(f"warmup is a fraction of the decay iterations in [0, 1], got {self.warmup}")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            out.append(
                f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                f"got {self.loss_normalization!r}"
            )
        if self.save_interval is not None and not self.save:
            out.append(
                f"save_interval ({self.save_interval}) is set but save (the directory) is not"
            )
        if self.keep_last_k is not None and not self.save:
            out.append(f"keep_last_k ({self.keep_last_k}) is set but save (the directory) is not")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            out.append(f"peak_tflops must be positive, got {self.peak_tflops}")
        return out

    # ---- derived schedule quantities -------------------------------------------------------
    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters if self.lr_decay_iters is not None else self.train_iters

    @property
    def warmup_iters(self) -> int:
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return int(round(self.warmup * self.decay_iters))

    def final_lr_ratio(self, peak_lr: float) -> float:
        """``r`` of the schedule: ``min_lr / peak`` when ``min_lr`` was given, else lr_decay_ratio."""
        if self.min_lr is not None:
            return self.min_lr / peak_lr
        return self.lr_decay_ratio

    def stop_iteration(self, start_iteration: int) -> int:
        """The iteration a launch that resumes after ``start_iteration`` stops at.

        As in Megatron, ``exit_interval`` stops at its next multiple, so relaunching the same
        command continues in chunks of ``exit_interval`` iterations until ``train_iters``.
        """
        if self.exit_interval is not None:
            next_multiple = (start_iteration // self.exit_interval + 1) * self.exit_interval
            return min(next_multiple, self.train_iters)
        return self.train_iters

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
