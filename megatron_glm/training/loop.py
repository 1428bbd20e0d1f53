"""The training loop: set-up, resume, iterations, validation, logging, checkpoints, exit.

``train(run, task)`` is everything after the command line was validated and ``torch.distributed``
started; the task (``megatron_glm.tasks.base.Task``) supplies the data, the loss and the
validation metrics, the loop decides when things happen. ``pretrain(run)`` runs the GLM
pretraining task. It resumes from the newest complete checkpoint under ``--load``; without one it
starts from the ``--load-pretrained`` weights (fresh optimizer, schedule and data position) or from
the initialisation (logged). It trains until ``--train-iters`` or the next multiple of
``--exit-interval``, and saves on ``--save-interval`` and when it stops, also when asked to stop
(SIGTERM/SIGINT, a dead launcher: all ranks agree, finish the iteration, save; training/guards.py);
a broken iteration (non-finite values, ...) raises ``TrainingBroken`` before anything is saved for
it. Exact resume:
model/optimizer/scheduler state (DeepSpeed), the consumed-sample count (the data order is a pure
function of the sample index) and every rank's RNG streams, restored right before the first
iteration, so a resumed run repeats the uninterrupted one bit for bit.

A task with a ``best_metric`` keeps the checkpoint of its best validation in ``<save>/best``
(a complete checkpoint, loadable with ``--load-pretrained``; ``best.json`` there says which
iteration and value, and survives a resume).

Hooks (``TrainingHooks``) are the seams for fault injection and monitoring: ``on_step_end(iteration,
stats)`` after every iteration and ``on_save(iteration, tag_dir)`` after this rank's checkpoint
files are written but before the checkpoint is published. ``MEGATRON_GLM_HOOKS=module:function``
names a function that receives the hooks object and registers callables on it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_glm.atomic_files import atomic_write_text
from megatron_glm.parallel.random import get_all_rng_states, set_all_rng_states
from megatron_glm.parallel.topology import ParallelTopology
from megatron_glm.tasks.base import Task, TaskData
from megatron_glm.training.arguments import BEST_DIR, RunConfig, own_outputs
from megatron_glm.training.checkpointing import (
    CheckpointRef,
    LoadDirError,
    checkpoint_to_resume,
    load_checkpoint,
    protect_checkpoint,
    save_checkpoint,
)
from megatron_glm.training.engine import StepStats, Trainer
from megatron_glm.training.faults import fault_point
from megatron_glm.training.guards import StepGuard
from megatron_glm.training.launch import ProgressBoard
from megatron_glm.training.metrics import (
    TrainLogger,
    device_peak_tflops,
    flops_per_token,
    memory_gib,
)
from megatron_glm.training.stop_signals import catch_stop_signals, stop_requested

logger = logging.getLogger(__name__)

HOOKS_ENV = "MEGATRON_GLM_HOOKS"


@dataclass
class TrainingHooks:
    on_step_end: list[Callable[[int, StepStats], None]] = field(default_factory=list)
    on_save: list[Callable[[int, Path], None]] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> TrainingHooks:
        hooks = cls()
        spec = os.environ.get(HOOKS_ENV)
        if spec:
            module_name, _, attr = spec.partition(":")
            if not attr:
                raise ValueError(f"{HOOKS_ENV}={spec!r} must look like 'package.module:function'")
            getattr(importlib.import_module(module_name), attr)(hooks)
        return hooks

    def _run_save_hooks(self, iteration: int, tag_dir: Path) -> None:
        for hook in self.on_save:
            hook(iteration, tag_dir)


def _loader(
    run: RunConfig,
    groups: Any,
    dataset: Any,
    collator: Any,
    consumed: int,
    num_workers: int,
    micro_batch_size: int | None = None,
) -> Iterator[dict[str, Any]]:
    from megatron_glm.data.loader import build_pretraining_data_loader

    return iter(
        build_pretraining_data_loader(
            dataset,
            collator,
            micro_batch_size or run.ds.micro_batch_size,
            groups.dp_rank,
            groups.dp_size,
            consumed_samples=consumed,
            num_workers=num_workers,
            seed=run.data.seed,
        )
    )


@dataclass(frozen=True)
class StartPoint:
    """Where the model's weights come from: a checkpoint of ours to resume (model, optimizer,
    schedule, data position, RNG), else the ``--load-pretrained`` weights (the model only), else
    the initialisation."""

    resume: CheckpointRef | None
    pretrained: str | None


def _agree_on_start(run: RunConfig, rank: int) -> StartPoint:
    """Rank 0 decides (one view of the file system), everyone uses its choice. A checkpoint to
    resume wins over ``--load-pretrained``: relaunching a continued-pretraining job resumes it."""
    t = run.training
    decision: list[Any] = [None]
    if rank == 0:
        try:
            ref = checkpoint_to_resume(
                t.load,
                ignore=own_outputs(t),
                model=run.model,
                hashes=t.verify_checkpoint_hashes,
                fallback=t.load_fallback,
            )
            decision = [StartPoint(ref, None if ref is not None else t.load_pretrained)]
        except LoadDirError as err:  # the directory changed since the command line was checked
            decision = [str(err)]
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        raise LoadDirError(decision[0])
    start: StartPoint = decision[0]
    if rank == 0 and start.resume is not None and t.load_pretrained:
        logger.info(
            "--load %s holds checkpoint %d: resuming it; --load-pretrained %s is ignored",
            t.load,
            start.resume.iteration,
            t.load_pretrained,
        )
    elif rank == 0 and start.resume is None:
        logger.info(
            "%s: starting %s",
            f"no checkpoint under --load {t.load}" if t.load else "no --load",
            "from the --load-pretrained weights" if start.pretrained else "fresh",
        )
    return start


def pretrain(run: RunConfig, hooks: TrainingHooks | None = None) -> int:
    """GLM pretraining; returns the last completed iteration. Every rank calls it."""
    from megatron_glm.tasks.pretraining import GLMPretraining

    return train(run, GLMPretraining(run), hooks).iteration


@dataclass
class TrainResult:
    """How a run ended: its last iteration, the trainer (for a final evaluation) and the best
    validation kept (``None`` without one)."""

    iteration: int
    trainer: Trainer
    groups: Any
    data: TaskData
    best: dict[str, Any] | None


def train(run: RunConfig, task: Task, hooks: TrainingHooks | None = None) -> TrainResult:
    """Train ``task``. Every rank calls it."""
    hooks = hooks if hooks is not None else TrainingHooks.from_env()
    t, ds = run.training, run.ds
    rank = dist.get_rank()
    topology = ParallelTopology(
        run.world_size, t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    )
    groups = topology.build_groups(rank)
    data = task.build_data(groups)
    start = _agree_on_start(run, rank)
    guard = StepGuard(run.failure, ds.precision, stop_requested, ProgressBoard.of_default_group())
    trainer = Trainer(run, groups, task, guard, pretrained=start.pretrained)

    iteration, consumed, rng_states = 0, 0, None
    ref = start.resume
    if ref is not None:
        layout = (t.tensor_model_parallel_size, t.pipeline_model_parallel_size)
        loaded = load_checkpoint(
            trainer.engine,
            ref,
            load_optimizer=t.load_optim,
            load_lr_scheduler=t.load_lr_scheduler,
            layout=layout,
        )
        if not t.load_optim:
            trainer.refresh_master_weights()
        iteration, consumed, rng_states = (
            loaded.iteration,
            loaded.consumed_samples,
            loaded.rng_states,
        )
        if rank == 0:
            logger.info(
                "resumed from %s: iteration %d, %d samples consumed", ref.path, iteration, consumed
            )

    stop = t.stop_iteration(iteration)
    # From here on SIGTERM/SIGINT are stop requests. Data-loader workers, forked next, inherit
    # that: torchrun and DeepSpeed's launcher signal them too, and they must outlive the save.
    restore_signals = catch_stop_signals()
    train_iter = _loader(run, groups, data.train, data.collator, consumed, run.data.num_workers)
    log = TrainLogger(
        rank=rank,
        log_json=t.log_json,
        tensorboard_dir=t.tensorboard_dir,
        progress_bar=t.progress_bar,
        start_iteration=iteration,
        stop_iteration=stop,
    )
    # model input positions (L = input_length, Part B and padding included): what the FLOPs cover
    tokens_per_iter = ds.train_batch_size * task.input_length
    flops_per_iter = flops_per_token(run.model, task.input_length) * tokens_per_iter
    peak = device_peak_tflops(t.peak_tflops)
    config_dict = run.to_dict()

    def save(at: int) -> None:
        save_checkpoint(
            trainer.engine,
            t.save,
            at,
            consumed_samples=consumed,
            config=config_dict,
            rng_states=get_all_rng_states(),
            keep_last_k=t.keep_last_k,
            on_written=hooks._run_save_hooks,
            layout_free=t.save_layout_free,
        )

    # Restore the streams last: everything above (model init, data set-up) may draw numbers.
    if rng_states is not None and t.load_rng:
        set_all_rng_states(rng_states)
    elif ref is not None and rank == 0:
        logger.warning("RNG streams not restored: the resumed run differs from the original")

    best = _read_best(t.save) if ref is not None else None
    last_saved = iteration if ref is not None else -1
    window_start, window_iters = time.perf_counter(), 0
    try:
        while iteration < stop:
            guard.begin(iteration + 1)
            micro_batches = [next(train_iter) for _ in range(ds.gradient_accumulation_steps)]
            stats = trainer.train_step(micro_batches)
            iteration += 1
            consumed += ds.train_batch_size
            window_iters += 1
            log.advance(stats.loss)
            broken = guard.verdict(stats.loss, stats.grad_norm, stats.applied, stats.loss_scale)
            for hook in hooks.on_step_end:
                hook(iteration, stats)
            if iteration % t.log_interval == 0 or iteration == stop or broken:
                elapsed = time.perf_counter() - window_start
                per_iter = elapsed / window_iters
                tflops = flops_per_iter / per_iter / run.world_size / 1e12
                log.log_train(
                    {
                        "step": iteration,
                        "loss": stats.loss,
                        "lr": stats.lr,
                        "grad_norm": stats.grad_norm,
                        "loss_scale": stats.loss_scale,
                        "skipped_steps": stats.skipped_steps,
                        "consumed_samples": consumed,
                        "iteration_time_s": per_iter,
                        "tokens_per_s": tokens_per_iter / per_iter,
                        "tflops": tflops,
                        "mfu": None if peak is None else tflops / peak,
                        "memory": memory_gib(),
                    }
                )
                window_start, window_iters = time.perf_counter(), 0
            if broken:
                if t.save and rank == 0:  # later runs' --keep-last-k must not delete it
                    protect_checkpoint(t.save, str(broken))
                raise broken
            if t.eval_interval and iteration % t.eval_interval == 0 and data.valid is not None:
                metrics = validate(run, groups, trainer, task, data, log, iteration)
                best = _keep_best(run, task, trainer, metrics, best, iteration, consumed)
                window_start, window_iters = time.perf_counter(), 0
            if t.save and t.save_interval and iteration % t.save_interval == 0:
                save(iteration)
                last_saved = iteration
                window_start, window_iters = time.perf_counter(), 0
            fault_point("step.end", rank=rank, iteration=iteration)
            if guard.stop_agreed:
                break
        if guard.stop_agreed and rank == 0:
            logger.warning(
                "stop requested: %s at iteration %d",
                "saving" if t.save else "nothing to save (no --save)",
                iteration,
            )
        if t.save and last_saved != iteration:
            save(iteration)
    finally:
        restore_signals()
        log.close()
    if rank == 0:
        logger.info("stopped at iteration %d of %d", iteration, t.train_iters)
    return TrainResult(iteration, trainer, groups, data, best)


def validate(
    run: RunConfig,
    groups: Any,
    trainer: Trainer,
    task: Task,
    data: TaskData,
    log: TrainLogger,
    iteration: int,
) -> dict[str, float]:
    """The task's validation over ``data.num_valid`` samples from the start of the validation
    split (pretraining: ``--eval-iters`` global batches)."""
    stats = evaluate_split(run, groups, trainer, task, data)
    return task.log_validation(log, iteration, stats)


def evaluate_split(
    run: RunConfig, groups: Any, trainer: Trainer, task: Task, data: TaskData
) -> Any:
    """The task's summed ``eval_stats`` over ``data.num_valid`` validation samples."""
    micro = task.eval_micro_batch_size or run.ds.micro_batch_size
    n = -(-data.num_valid // (micro * groups.dp_size))
    it = _loader(run, groups, data.valid, data.collator, 0, 0, micro_batch_size=micro)
    return trainer.evaluate(next(it) for _ in range(n))


def _read_best(save: str | None) -> dict[str, Any] | None:
    path = Path(save, BEST_DIR, "best.json") if save else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _keep_best(
    run: RunConfig,
    task: Task,
    trainer: Trainer,
    metrics: dict[str, float],
    best: dict[str, Any] | None,
    iteration: int,
    consumed: int,
) -> dict[str, Any] | None:
    """Save the model to ``<save>/best`` when ``task.best_metric`` improved (every rank)."""
    name, save = task.best_metric, run.training.save
    if name is None or save is None or name not in metrics:
        return best
    sign = 1.0 if task.higher_is_better else -1.0
    if best is not None and sign * metrics[name] <= sign * best["value"]:
        return best
    directory = Path(save, BEST_DIR)
    save_checkpoint(
        trainer.engine,
        directory,
        iteration,
        consumed_samples=consumed,
        config=run.to_dict(),
        rng_states=get_all_rng_states(),
        keep_last_k=1,
        layout_free=run.training.save_layout_free,
    )
    best = {"iteration": iteration, "metric": name, "value": metrics[name], "metrics": metrics}
    if dist.get_rank() == 0:
        atomic_write_text(directory / "best.json", json.dumps(best, indent=2) + "\n")
        logger.info(
            "best %s so far (%.6f) at iteration %d: kept in %s",
            name,
            metrics[name],
            iteration,
            directory,
        )
    return best
