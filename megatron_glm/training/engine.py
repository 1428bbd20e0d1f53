"""The DeepSpeed engine around GLM and the work of one iteration.

Shape legend: b micro-batch, s sequence, v/w this rank's vocab shard.

What a micro-batch holds besides the model inputs, and what its loss and validation numbers are,
is the task's (``megatron_glm.tasks.base.Task``); the engine runs any task the same way.

``Trainer`` builds either a plain ``DeepSpeedEngine`` over ``GLMModel`` (pipeline size 1; our
``ParallelGroups`` is DeepSpeed's ``mpu``) or a ``PipelineEngine`` over ``build_pipeline_module``,
with the optimizer from the JSON, weight-decay groups from the model, and the GLM LR schedule.

Loss normalisation (docs/training.md). Before any loss of an iteration is computed, the loss-unit
count (the task's ``loss_units``: tokens, or examples) of all its micro-batches is summed and
all-reduced over data parallelism: ``N``. DeepSpeed then divides each micro-batch loss by the
accumulation steps ``g`` and averages gradients over the ``d`` data-parallel ranks, so each
micro-batch's loss is ``sum(ce * mask) / (N / (g * d))``: the gradient is that of the mean over all
``N`` units, in every layout. The logged loss is DeepSpeed's
aggregate (sum over micro-batches / g, mean over ranks) = that same global mean. With
``--loss-normalization micro-batch`` the normaliser is the micro-batch's own count (the official
per-micro-batch mean, averaged over micro-batches and ranks).

fp16 at ZeRO stage 0 (docs/training.md, "fp16"). DeepSpeed wraps the optimizer in
``FP16_Optimizer`` / ``FP16_UnfusedOptimizer``, whose ``step()`` divides the gradients by the loss
scale and treats inf/nan as overflow; DeepSpeed 0.19.8's ``engine.backward`` multiplies the loss by
that scale only for ZeRO optimizers (upstream pull request 8393), so the trainer applies the scale
itself, through a gradient hook on the loss, when it sees that DeepSpeed did not. It also measures
the gradient norm itself there (the unfused optimizer reports it still multiplied by the scale).
The same wrappers serve bf16 at ZeRO 0 without a pipeline (loss scale 1); in both precisions the
trainer measures the gradient norm, hands it to the unfused optimizer to clip by, and undoes the
zero-gradient Adam step with which those optimizers prime their state.

The run's ``StepGuard`` (training/guards.py) sees every training loss and is consulted inside the
optimizer step, before the update: a non-finite value on any rank, or a stop request, is agreed
there by all ranks, and a vetoed update leaves the parameters untouched.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.kernels.host import keep_freed_memory
from megatron_glm.model import GLMModel, param_groups_for_weight_decay
from megatron_glm.parallel.random import model_parallel_seed
from megatron_glm.tasks.base import MODEL_INPUTS, MicroBatch, Task
from megatron_glm.training.arguments import RunConfig
from megatron_glm.training.guards import StepGuard
from megatron_glm.training.lr_schedule import GLMLRScheduler
from megatron_glm.training.pipeline import (
    PipelineLoss,
    build_pipeline_module,
    module_canonical_name,
)

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    loss: float
    lr: float  # the learning rate this iteration's update used
    grad_norm: float | None
    loss_scale: float | None
    skipped_steps: int
    applied: bool  # False when fp16 overflow skipped the update


def _is_stage0_fp16_optimizer(optimizer: Any) -> bool:
    """DeepSpeed's fp16 optimizer wrappers without ZeRO (ZeRO stage 0). DeepSpeed 0.19.8 also
    takes them for bf16 at stage 0 without pipeline parallelism (a bf16 low-precision type; with
    a pipeline it takes its ``BF16_Optimizer``)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer))


def loss_scale_factor(loss_grad: float, gas: int, scale: float) -> float:
    """What the gradient arriving at a micro-batch loss still has to be multiplied by: ``scale``
    when DeepSpeed's backward only divided it by the ``gas`` accumulation steps (``1 / gas``), 1
    when DeepSpeed also applied the loss scale (``scale / gas``). Anything else means DeepSpeed
    changed how it scales, and is an error rather than a guess."""
    seen = loss_grad * gas
    if math.isclose(seen, 1.0, rel_tol=1e-3):
        return scale
    if math.isclose(seen, scale, rel_tol=1e-3):
        return 1.0
    raise RuntimeError(
        f"fp16 at ZeRO stage 0: the gradient reaching the loss is {loss_grad} with {gas} "
        f"accumulation steps and loss scale {scale}; expected {1 / gas} (DeepSpeed does not "
        f"scale the loss) or {scale / gas} (it does)"
    )


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- weights from --load-pretrained -----------------------------------------------------------
@dataclass(frozen=True)
class PretrainedWeights:
    """What ``load_pretrained_weights`` put into the model (for the log)."""

    path: str
    form: str
    iteration: int | None
    num_tensors: int  # canonical tensors read
    num_local: int  # of them held by this rank (its pipeline stage)
    dtypes: tuple[str, ...]  # the checkpoint's tensor dtypes


def canonical_tensors(model: nn.Module, num_layers: int) -> dict[str, torch.Tensor]:
    """This rank's parameters under their canonical names (docs/model.md#canonical-parameter-names).

    A ``GLMModel``'s state-dict names are canonical; a pipeline stage's are DeepSpeed's layer
    indices and ``tied_modules``, mapped by ``pipeline.module_canonical_name``. The tied word table
    appears on the first and on the last stage: both load it.
    """
    state = model.state_dict(keep_vars=True)
    if isinstance(model, GLMModel):
        return dict(state)
    return {module_canonical_name(name, num_layers): tensor for name, tensor in state.items()}


def _read_pretrained(path: str, config: GLMConfig) -> tuple[dict[str, Any], Any]:
    """Rank 0's read: a header for every rank (the tensor list, or the problems) and the
    checkpoint. Any reason not to load becomes the header's problems, so every rank fails alike."""
    from megatron_glm.conversion import CheckpointError, detect_form, read_checkpoint
    from megatron_glm.conversion.canonical import state_problems

    try:
        form = detect_form(path)
        checkpoint = read_checkpoint(path, config)
    except Exception as err:  # any failure: the other ranks must hear of it, not wait for tensors
        if isinstance(err, CheckpointError):
            return {"problems": err.problems}, None
        return {"problems": [f"{path}: cannot be read ({type(err).__name__}: {err})"]}, None
    # the form checked its config against ``config``; the tensors must fit the model exactly
    problems = state_problems(checkpoint.state, config, path)
    if problems:
        return {"problems": problems}, None
    header = {
        "problems": [],
        "form": form,
        "iteration": checkpoint.iteration,
        "tensors": [
            (name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
            for name, t in checkpoint.state.items()
        ],
    }
    return header, checkpoint


def load_pretrained_weights(
    model: nn.Module, path: str, config: GLMConfig, groups: Any
) -> PretrainedWeights:
    """Copy the weights of the checkpoint at ``path`` (any form, any source TP/PP) into ``model``
    (a ``GLMModel`` or this rank's pipeline stage), before DeepSpeed wraps it: ZeRO partitions and
    the fp32 master weights are then made from them. Every rank calls this.

    Rank 0 alone reads the checkpoint into canonical TP=1 tensors; they are broadcast one at a
    time and every rank keeps its TP slice of the names its stage holds, so no other rank holds
    more than one full tensor at once. A checkpoint that cannot be read or does not fit raises
    ``CheckpointError`` (every problem) on every rank.
    """
    from megatron_glm.conversion import CheckpointError
    from megatron_glm.conversion.canonical import shard_state

    rank, world = dist.get_rank(), dist.get_world_size()
    header, checkpoint = _read_pretrained(path, config) if rank == 0 else ({}, None)
    box = [header]
    dist.broadcast_object_list(box, src=0)
    header = box[0]
    if header["problems"]:
        raise CheckpointError(header["problems"])

    local = canonical_tensors(model, config.num_layers)
    missing = sorted(set(local) - {name for name, _, _ in header["tensors"]})
    assert not missing, f"model tensors without a canonical name in the checkpoint: {missing}"
    # NCCL moves CUDA tensors only; the model itself is still on the CPU here
    nccl = dist.get_backend() == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    with torch.no_grad():
        for name, shape, dtype in header["tensors"]:
            if rank == 0:
                full = checkpoint.state.pop(name).to(comm).contiguous()
            else:
                full = torch.empty(shape, dtype=getattr(torch, dtype), device=comm)
            if world > 1:
                dist.broadcast(full, src=0)
            target = local.get(name)
            if target is None:
                continue  # held by another pipeline stage
            piece = shard_state({name: full}, config, groups.tp_rank, groups.tp_size)[name]
            if tuple(piece.shape) != tuple(target.shape):
                raise CheckpointError(
                    [
                        f"{path}: {name} gives TP rank {groups.tp_rank} a slice of shape "
                        f"{tuple(piece.shape)}, the model holds {tuple(target.shape)}"
                    ]
                )
            target.copy_(piece.to(device=target.device, dtype=target.dtype))
    return PretrainedWeights(
        path=path,
        form=header["form"],
        iteration=header["iteration"],
        num_tensors=len(header["tensors"]),
        num_local=len(local),
        dtypes=tuple(sorted({dtype for _, _, dtype in header["tensors"]})),
    )


class Trainer:
    """One engine and what an iteration does with it; every rank builds one."""

    def __init__(
        self,
        run: RunConfig,
        groups: Any,
        task: Task,
        guard: StepGuard,
        pretrained: str | None = None,
    ) -> None:
        """``task``: what the run trains on and how its loss and metrics are computed
        (megatron_glm/tasks); ``guard``: sees every training loss and decides, with the other
        ranks, whether each update happens (training/guards.py); ``pretrained``: a checkpoint
        (any form) whose weights the model starts from."""
        self.run = run
        self.groups = groups
        self.task = task
        self.guard = guard
        self.device = _device()
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse freed activations instead of faulting them in every step
        self.pipelined = groups.pp_size > 1
        self.tp_group = groups.tp_group if groups.tp_size > 1 else None
        self.gas = run.ds.gradient_accumulation_steps
        # Dropout streams: the same seed on every TP rank (replicated activations), a different
        # one per pipeline stage as in Megatron; the TP-partitioned stream is P's tracker.
        model_parallel_seed(run.training.seed + 100 * groups.pp_rank, groups.tp_rank)
        self._recorded_grad_norm: float | None = None
        self._train_shape: tuple[int, ...] | None = None  # of the last training micro-batch

        import deepspeed

        # Our process group is already up (launch.init_distributed); DeepSpeed's comm layer wraps
        # it. PipelineModule talks to that layer before deepspeed.initialize would set it up.
        deepspeed.init_distributed(
            dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
        )
        ds = run.ds
        if self.pipelined:
            self.loss_fn: PipelineLoss | None = PipelineLoss(task, self.tp_group)
            model = build_pipeline_module(run.model, groups, self.loss_fn)
            mpu = None  # the PipelineModule brings its own grid (same rank order as ours)
        else:
            self.loss_fn = None
            model = GLMModel(run.model, self.tp_group)
            mpu = groups
        self.pretrained: PretrainedWeights | None = None
        if pretrained is not None:
            self.pretrained = load_pretrained_weights(model, pretrained, run.model, groups)
            self._log_pretrained(self.pretrained, model)
        param_groups = param_groups_for_weight_decay(model, ds.weight_decay)
        t = run.training

        def make_scheduler(optimizer: Any) -> GLMLRScheduler:
            return GLMLRScheduler(
                optimizer,
                peak_lr=ds.peak_lr,
                warmup_iters=t.warmup_iters,
                decay_iters=t.decay_iters,
                decay_style=t.lr_decay_style,
                final_ratio=t.final_lr_ratio(ds.peak_lr),
            )

        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model,
            model_parameters=param_groups,
            config=ds.config,
            mpu=mpu,
            lr_scheduler=make_scheduler,
            dist_init_required=False,
        )
        self._install_grad_norm_probe()
        # fp16 at ZeRO stage 0: see the module docstring. None until the first backward shows
        # whether DeepSpeed applied the loss scale itself.
        self._deepspeed_scales_loss: bool | None = None
        self._scaled_grad_norm = float("nan")  # the norm the stage-0 fp16 optimizer clips by
        stage0_wrapper = _is_stage0_fp16_optimizer(self.engine.optimizer)
        if stage0_wrapper:  # fp16 or bf16: both prime Adam and clip by a TP/PP-blind norm
            self._undo_adam_priming()
            self._install_stage0_norm_probe()
        self.fp16_stage0 = run.ds.precision == "fp16" and stage0_wrapper
        if self.fp16_stage0 and self.pipelined:
            self._install_pipeline_loss_scale_hook()
        self._install_guard()
        if groups.rank == 0:
            basic, wrapper = self.engine.basic_optimizer, self.engine.optimizer
            logger.info(
                "engine: %s, optimizer %s, ZeRO stage %d, %s, micro batch %d x %d accumulation "
                "x %d data-parallel = %d per iteration",
                type(self.engine).__name__,
                type(basic).__name__
                + ("" if wrapper is basic else f" in DeepSpeed's {type(wrapper).__name__}"),
                ds.zero_stage,
                ds.precision,
                ds.micro_batch_size,
                self.gas,
                ds.data_parallel_size,
                ds.train_batch_size,
            )

    def _log_pretrained(self, loaded: PretrainedWeights, model: nn.Module) -> None:
        if self.groups.rank != 0:
            return
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        cast = ", ".join(loaded.dtypes)
        cast += f" -> {dtype}" if loaded.dtypes != (dtype,) else " (no cast)"
        logger.info(
            "model initialised from --load-pretrained %s: %s form, iteration %s, %d tensors "
            "(%d on this stage), %s; the run trains in %s from iteration 0 with a fresh "
            "optimizer, LR schedule and data position",
            loaded.path,
            loaded.form,
            "unknown" if loaded.iteration is None else loaded.iteration,
            loaded.num_tensors,
            loaded.num_local,
            cast,
            self.run.ds.precision,
        )

    def refresh_master_weights(self) -> None:
        """After loading a checkpoint's weights without its optimizer state (``--no-load-optim``):
        make the fp32 master weights of DeepSpeed's ZeRO-0 fp16/bf16 optimizers match the loaded
        weights. DeepSpeed 0.19.8's ``load_checkpoint`` re-derives them for ZeRO only; at stage 0
        the masters would keep the initial values and the first step would write those back (the
        official code calls ``refresh_fp32_params`` here too)."""
        optimizer = self.engine.optimizer
        if self.run.ds.zero_stage == 0 and hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()

    def _install_guard(self) -> None:
        """The guard's agreement runs inside the optimizer step, outermost (after every wrapper
        above): each engine calls ``optimizer.step`` once per iteration at the accumulation
        boundary (the pipeline engine too, on every stage), after the gradients were reduced.
        Pipeline: the training losses are computed in the ``PipelineModule``'s ``loss_fn``."""
        optimizer = self.engine.optimizer
        inner_step = optimizer.step

        @functools.wraps(inner_step)  # keeps the marks torch's LR scheduler put on it
        def step(*args: Any, **kwargs: Any) -> Any:
            grads = (p.grad for p in self.engine.module.parameters())
            return inner_step(*args, **kwargs) if self.guard.allow_update(grads) else None

        optimizer.step = step
        if self.pipelined:
            module = self.engine.module
            loss_fn = module.loss_fn

            def observed_loss_fn(*args: Any) -> torch.Tensor:
                loss = loss_fn(*args)
                return self.guard.observe_loss(loss) if loss.requires_grad else loss

            module.loss_fn = observed_loss_fn

    # ---- gradient norm ------------------------------------------------------------------------
    def _install_grad_norm_probe(self) -> None:
        """DeepSpeed's ZeRO / bf16 optimizers report the global norm themselves (its stage-0 fp16
        ones not reliably: ``_install_stage0_norm_probe``); a plain torch optimizer (fp32, ZeRO 0)
        does not, so we measure it before the update (and replace DeepSpeed's fp32 clipping, which
        would otherwise hide the pre-clip norm from us)."""
        optimizer = self.engine.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            return
        if self.engine.gradient_clipping() > 0:
            self.engine.clip_fp32_gradients = self._clip_fp32_gradients  # type: ignore[method-assign]
        else:
            optimizer.register_step_pre_hook(lambda *_: self._measure_grad_norm())

    def _parameters_for_norm(self) -> Iterator[torch.Tensor]:
        for param in self.engine.module.parameters():
            if param.grad is None or getattr(param, "ds_pipe_replicated", False):
                continue  # the last stage's tied copy is counted on the first stage
            if not getattr(param, "tensor_model_parallel", False) and self.groups.tp_rank != 0:
                continue  # replicated over TP: count once
            yield param

    def _measure_grad_norm(self) -> float:
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for param in self._parameters_for_norm():
            sq += param.grad.detach().double().pow(2).sum()
        if self.groups.mp_group is not None and dist.get_world_size(self.groups.mp_group) > 1:
            dist.all_reduce(sq, group=self.groups.mp_group)
        self._recorded_grad_norm = float(sq.sqrt())
        return self._recorded_grad_norm

    def _clip_fp32_gradients(self) -> None:
        norm = self._measure_grad_norm()
        max_norm = self.engine.gradient_clipping()
        if norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for param in self.engine.module.parameters():
                if param.grad is not None:
                    param.grad.detach().mul_(scale)

    def _grad_norm(self) -> float | None:
        if self._recorded_grad_norm is not None:
            return self._recorded_grad_norm
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    # ---- fp16 (and bf16) at ZeRO stage 0 -------------------------------------------------------
    def _install_pipeline_loss_scale_hook(self) -> None:
        """fp16: the loss-scale hook on every training loss of the pipeline's last stage, which
        computes it in the ``PipelineModule``'s ``loss_fn`` (the other stages only see gradients
        that already carry the scale; without a pipeline ``train_step`` registers it)."""
        module = self.engine.module
        loss_fn = module.loss_fn

        def scaled_loss_fn(*args: Any) -> torch.Tensor:
            loss = loss_fn(*args)
            if loss.requires_grad:  # not under eval_batch's no_grad
                loss.register_hook(self._loss_scale_hook)
            return loss

        module.loss_fn = scaled_loss_fn

    def _install_stage0_norm_probe(self) -> None:
        """Our own gradient norm before each optimizer step, and the unfused optimizer clipping by
        it. bf16 goes through here too (its loss scale is a static 1): measured with TP 2 at
        ZeRO 0, DeepSpeed's own norm was 2.133 where TP 1 had 2.318."""
        optimizer = self.engine.optimizer
        inner_step = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            # FP16_UnfusedOptimizer stashes the norm still multiplied by the scale, and both
            # optimizers divide by the scale after possibly doubling it at the end of a good
            # window; so: the norm of the gradients as they are, over the scale they carry.
            self._scaled_grad_norm = self._measure_grad_norm()
            self._recorded_grad_norm = self._scaled_grad_norm / float(optimizer.loss_scale)
            return inner_step(*args, **kwargs)

        optimizer.step = step

        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        if isinstance(optimizer, FP16_UnfusedOptimizer):
            unscale_and_clip = optimizer.unscale_and_clip_grads

            def clip_with_our_norm(total_norm: float, apply_scale: bool = True) -> Any:
                # Its own norm (get_weight_norm over the bare gradient tensors) cannot tell
                # TP-partitioned parameters or pipeline-tied copies: with TP 2 it clipped by 2.07
                # for a norm of 2.29, with PP 2 by 2.51. Ours is the scaled norm it expects.
                return unscale_and_clip(self._scaled_grad_norm, apply_scale)

            optimizer.unscale_and_clip_grads = clip_with_our_norm

    def _undo_adam_priming(self) -> None:
        """DeepSpeed's stage-0 fp16 optimizers (also used for bf16: ``_is_stage0_fp16_optimizer``)
        "initialize the optimizer states" by stepping the inner optimizer once on zero gradients
        (ZeRO and ``BF16_Optimizer`` do not). For Adam that is a phantom
        step: its bias correction runs one step ahead (the first real update is about 0.74 of
        ZeRO's or fp32's with betas 0.9/0.98) and the fp32 master weights take one extra weight
        decay. Adam creates its state lazily, so forget that state and restore the masters from
        the fp16/bf16 parameters (which that step did not touch; the masters were copied from
        them, so this is exact). Only an Adam state that is exactly
        one step on zero gradients is reset; anything else is left to DeepSpeed."""
        optimizer = self.engine.optimizer
        states = list(optimizer.optimizer.state.values())
        primed = bool(states) and all(
            "exp_avg" in state and float(state.get("step", 0)) == 1 and not state["exp_avg"].any()
            for state in states
        )
        if primed:
            optimizer.optimizer.state.clear()
            optimizer.refresh_fp32_params()

    def _loss_scale_hook(self, grad: torch.Tensor) -> torch.Tensor | None:
        """Gradient hook on a micro-batch loss: multiply the incoming gradient by the loss scale
        unless DeepSpeed already did. Which of the two it is, is read off the first gradient
        (``1 / g`` unscaled, ``scale / g`` scaled, for ``g`` accumulation steps) rather than from
        DeepSpeed's version, so a DeepSpeed with the fix is not scaled twice."""
        scale = float(self.engine.optimizer.loss_scale)
        if self._deepspeed_scales_loss is None:
            if scale == 1.0:
                return None  # nothing to tell apart, and nothing to apply
            factor = loss_scale_factor(float(grad), self.gas, scale)
            self._deepspeed_scales_loss = factor == 1.0
            logger.info(
                "fp16 at ZeRO stage 0: %s",
                "DeepSpeed applies the loss scale itself"
                if self._deepspeed_scales_loss
                else "DeepSpeed does not apply the loss scale in engine.backward (upstream "
                "pull request 8393); the trainer applies it",
            )
        return None if self._deepspeed_scales_loss else grad * scale

    # ---- batches ------------------------------------------------------------------------------
    def _normalizers(self, micro_batches: Sequence[MicroBatch]) -> list[torch.Tensor]:
        counts = torch.stack([self.task.loss_units(mb).double() for mb in micro_batches])
        if self.run.training.loss_normalization == "micro-batch":
            return [c.clamp(min=1.0).float().reshape(1) for c in counts]
        total = counts.sum().to(self.device)
        if self.groups.dp_size > 1:
            dist.all_reduce(total, group=self.groups.dp_group)
        per_micro = (total.clamp(min=1.0) / (self.gas * self.groups.dp_size)).float().reshape(1)
        return [per_micro.cpu()] * len(micro_batches)

    def _on_device(
        self, mb: MicroBatch
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The model inputs ``(tokens, position_ids, sep)`` and the task's targets."""
        inputs = tuple(mb[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS)
        targets = tuple(t.to(self.device, non_blocking=True) for t in self.task.targets(mb))
        return inputs, targets

    def _pipe_items(
        self, micro_batches: Sequence[MicroBatch], normalizers: Sequence[torch.Tensor]
    ) -> Iterator[Any]:
        for mb, norm in zip(micro_batches, normalizers):
            inputs, targets = self._on_device(mb)
            yield inputs, (*targets, norm.to(self.device))

    def _current_lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    def _loss_scale(self) -> float | None:
        if self.run.ds.precision != "fp16":
            return None
        opt = self.engine.optimizer
        # DeepSpeed's fp16 and ZeRO optimizers expose the dynamic scale as a `loss_scale` property
        scale = getattr(opt, "loss_scale", None)
        if scale is None:
            scale = getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
        return None if scale is None else float(scale)

    # ---- one iteration ------------------------------------------------------------------------
    def train_step(self, micro_batches: Sequence[MicroBatch]) -> StepStats:
        """Forward/backward over this rank's ``gas`` micro-batches, then one optimizer update."""
        assert len(micro_batches) == self.gas, (len(micro_batches), self.gas)
        lr = self._current_lr()
        skipped_before = self.engine.skipped_steps
        self._recorded_grad_norm = None
        normalizers = self._normalizers(micro_batches)
        self._train_shape = tuple(micro_batches[0]["tokens"].shape)
        self.engine.train()
        if self.pipelined:
            loss = self.engine.train_batch(data_iter=self._pipe_items(micro_batches, normalizers))
            loss_value = float(loss)
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for mb, norm in zip(micro_batches, normalizers):
                inputs, targets = self._on_device(mb)
                logits = self.engine(*inputs)  # [b, s, v/w]
                loss = self.task.loss(
                    logits, targets, self.tp_group, norm.to(self.device).reshape(())
                )
                loss = self.guard.observe_loss(loss)
                if self.fp16_stage0:
                    loss.register_hook(self._loss_scale_hook)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().float()
            # DeepSpeed's aggregate: sum over micro-batches / g, mean over data parallelism
            total /= self.gas
            if self.groups.dp_size > 1:
                dist.all_reduce(total, group=self.groups.dp_group)
                total /= self.groups.dp_size
            loss_value = float(total)
        skipped = self.engine.skipped_steps
        applied = skipped == skipped_before and not self.guard.vetoed
        return StepStats(
            loss=loss_value,
            lr=lr,
            # a skipped step has no norm (ZeRO reports none, the stage-0 fp16 optimizers inf)
            grad_norm=self._grad_norm() if applied else None,
            loss_scale=self._loss_scale(),
            skipped_steps=int(skipped),
            applied=applied,
        )

    @torch.no_grad()
    def evaluate(self, micro_batches: Iterable[MicroBatch]) -> torch.Tensor:
        """The task's ``eval_stats`` summed over ``micro_batches`` (this rank's share) and over
        data parallelism (float64); every rank gets the result."""
        batches = list(micro_batches)
        total: torch.Tensor | None = None
        self.engine.eval()
        if self.pipelined:
            assert self.loss_fn is not None
            self.loss_fn.records = []
            ones = [torch.ones(1)] * len(batches)
            # DeepSpeed caches the activation shape between stages: a validation micro-batch of
            # another size (--eval-batch-size) must not reuse it, nor leave its own behind
            resize = tuple(batches[0]["tokens"].shape) != self._train_shape
            if resize:
                self.engine.reset_activation_shape()
            self.engine.eval_batch(
                self._pipe_items(batches, ones),
                compute_loss=True,
                reduce_output=None,
                bcast_loss=False,
                num_micro_batches=len(batches),
            )
            if resize:
                self.engine.reset_activation_shape()
            records, self.loss_fn.records = self.loss_fn.records, None
            if not self.groups.is_last_stage:
                records = []
        else:
            records = []
            for mb in batches:
                inputs, targets = self._on_device(mb)
                records.append(self.task.eval_stats(self.engine(*inputs), targets, self.tp_group))
        for record in records:  # in order, one by one: the same sums in every layout
            total = record.double().cpu() if total is None else total + record.double().cpu()
        self.engine.train()
        size = torch.tensor([0 if total is None else total.numel()], device=self.device)
        if self.pipelined:  # only the last stage knows the size of the task's vector
            dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self.groups.pp_group)
        stats = torch.zeros(int(size), dtype=torch.float64, device=self.device)
        if total is not None:
            stats += total.to(self.device)
        if self.groups.dp_size > 1:
            dist.all_reduce(stats, group=self.groups.dp_group)
        if self.pipelined:  # the last stage has the numbers; share them along the pipeline
            dist.broadcast(stats, src=self.groups.pp_ranks[-1], group=self.groups.pp_group)
        return stats.cpu()
