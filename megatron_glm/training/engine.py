"""The DeepSpeed engine around GLM and the work of one iteration.

Shape legend: b micro-batch, s sequence, v/w this rank's vocab shard.

``Trainer`` builds either a plain ``DeepSpeedEngine`` over ``GLMModel`` (pipeline size 1; our
``ParallelGroups`` is DeepSpeed's ``mpu``) or a ``PipelineEngine`` over ``build_pipeline_module``,
with the optimizer from the JSON, weight-decay groups from the model, and the GLM LR schedule.

Loss normalisation (GLM_SPEC §5). Before any loss of an iteration is computed, the loss-token count
of all its micro-batches is summed and all-reduced over data parallelism: ``N``. DeepSpeed then
divides each micro-batch loss by the accumulation steps ``g`` and averages gradients over the
``d`` data-parallel ranks, so each micro-batch's loss is ``sum(ce * mask) / (N / (g * d))``: the
gradient is that of the mean over all ``N`` tokens, in every layout. The logged loss is DeepSpeed's
aggregate (sum over micro-batches / g, mean over ranks) = that same global mean. With
``--loss-normalization micro-batch`` the normaliser is the micro-batch's own count (the official
per-micro-batch mean, averaged over micro-batches and ranks).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.data.blank_infilling import OBJECTIVES
from megatron_glm.model import GLMModel, glm_loss, param_groups_for_weight_decay
from megatron_glm.parallel.random import model_parallel_seed
from megatron_glm.training.arguments import RunConfig
from megatron_glm.training.lr_schedule import GLMLRScheduler
from megatron_glm.training.pipeline import PipelineLoss, build_pipeline_module

logger = logging.getLogger(__name__)

MicroBatch = dict[str, Any]


@dataclass
class StepStats:
    loss: float
    lr: float  # the learning rate this iteration's update used
    grad_norm: float | None
    loss_scale: float | None
    skipped_steps: int
    applied: bool  # False when fp16 overflow skipped the update


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Trainer:
    """One engine and what an iteration does with it; every rank builds one."""

    def __init__(self, run: RunConfig, groups: Any) -> None:
        self.run = run
        self.groups = groups
        self.device = _device()
        self.pipelined = groups.pp_size > 1
        self.tp_group = groups.tp_group if groups.tp_size > 1 else None
        self.gas = run.ds.gradient_accumulation_steps
        # Dropout streams: the same seed on every TP rank (replicated activations), a different
        # one per pipeline stage as in Megatron; the TP-partitioned stream is P's tracker.
        model_parallel_seed(run.training.seed + 100 * groups.pp_rank, groups.tp_rank)
        self._recorded_grad_norm: float | None = None

        import deepspeed

        # Our process group is already up (launch.init_distributed); DeepSpeed's comm layer wraps
        # it. PipelineModule talks to that layer before deepspeed.initialize would set it up.
        deepspeed.init_distributed(
            dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
        )
        ds = run.ds
        if self.pipelined:
            self.loss_fn: PipelineLoss | None = PipelineLoss(self.tp_group)
            model = build_pipeline_module(run.model, groups, self.loss_fn)
            mpu = None  # the PipelineModule brings its own grid (same rank order as ours)
        else:
            self.loss_fn = None
            model = GLMModel(run.model, self.tp_group)
            mpu = groups
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
        if groups.rank == 0:
            logger.info(
                "engine: %s, optimizer %s, ZeRO stage %d, %s, micro batch %d x %d accumulation "
                "x %d data-parallel = %d per iteration",
                type(self.engine).__name__,
                type(self.engine.basic_optimizer).__name__,
                ds.zero_stage,
                ds.precision,
                ds.micro_batch_size,
                self.gas,
                ds.data_parallel_size,
                ds.train_batch_size,
            )

    # ---- gradient norm ------------------------------------------------------------------------
    def _install_grad_norm_probe(self) -> None:
        """DeepSpeed's ZeRO / bf16 / fp16 optimizers report the global norm themselves; a plain
        torch optimizer (fp32, ZeRO 0) does not, so we measure it before the update (and replace
        DeepSpeed's fp32 clipping, which would otherwise hide the pre-clip norm from us)."""
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

    # ---- batches ------------------------------------------------------------------------------
    def _normalizers(self, micro_batches: Sequence[MicroBatch]) -> list[torch.Tensor]:
        counts = torch.stack([mb["loss_mask"].double().sum() for mb in micro_batches])
        if self.run.training.loss_normalization == "micro-batch":
            return [c.clamp(min=1.0).float().reshape(1) for c in counts]
        total = counts.sum().to(self.device)
        if self.groups.dp_size > 1:
            dist.all_reduce(total, group=self.groups.dp_group)
        per_micro = (total.clamp(min=1.0) / (self.gas * self.groups.dp_size)).float().reshape(1)
        return [per_micro.cpu()] * len(micro_batches)

    def _to_device(self, mb: MicroBatch) -> dict[str, torch.Tensor]:
        keys = ("tokens", "position_ids", "sep", "labels", "loss_mask")
        return {k: mb[k].to(self.device, non_blocking=True) for k in keys}

    def _pipe_items(
        self, micro_batches: Sequence[MicroBatch], normalizers: Sequence[torch.Tensor]
    ) -> Iterator[Any]:
        for mb, norm in zip(micro_batches, normalizers):
            t = self._to_device(mb)
            yield (
                (t["tokens"], t["position_ids"], t["sep"]),
                (t["labels"], t["loss_mask"], norm.to(self.device)),
            )

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
        self.engine.train()
        if self.pipelined:
            loss = self.engine.train_batch(data_iter=self._pipe_items(micro_batches, normalizers))
            loss_value = float(loss)
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for mb, norm in zip(micro_batches, normalizers):
                t = self._to_device(mb)
                logits = self.engine(t["tokens"], t["position_ids"], t["sep"])  # [b, s, v/w]
                loss = glm_loss(
                    logits,
                    t["labels"],
                    t["loss_mask"],
                    self.tp_group,
                    norm.to(self.device).reshape(()),
                )
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
        return StepStats(
            loss=loss_value,
            lr=lr,
            grad_norm=self._grad_norm(),
            loss_scale=self._loss_scale(),
            skipped_steps=int(skipped),
            applied=skipped == skipped_before,
        )

    @torch.no_grad()
    def evaluate(self, micro_batches: Iterable[MicroBatch]) -> dict[str, tuple[float, int]]:
        """Summed loss and loss-token count per objective over ``micro_batches`` (this rank's
        share), reduced over data parallelism; every rank gets the result."""
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, float] = defaultdict(float)
        batches = list(micro_batches)
        objectives = [mb["objective"] for mb in batches]
        self.engine.eval()
        if self.pipelined:
            assert self.loss_fn is not None
            self.loss_fn.records = []
            ones = [torch.ones(1)] * len(batches)
            self.engine.eval_batch(
                self._pipe_items(batches, ones),
                compute_loss=True,
                reduce_output=None,
                bcast_loss=False,
                num_micro_batches=len(batches),
            )
            records, self.loss_fn.records = self.loss_fn.records, None
            if self.groups.is_last_stage:
                for objective, (loss_sum, count) in zip(objectives, records):
                    sums[objective] += float(loss_sum)
                    counts[objective] += float(count)
        else:
            for mb, objective in zip(batches, objectives):
                t = self._to_device(mb)
                logits = self.engine(t["tokens"], t["position_ids"], t["sep"])
                sums[objective] += float(
                    glm_loss(logits, t["labels"], t["loss_mask"], self.tp_group, 1.0)
                )
                counts[objective] += float(t["loss_mask"].sum())
        self.engine.train()
        names = list(OBJECTIVES)  # a fixed order: ranks may have seen different objectives
        stats = torch.tensor(
            [[sums[n], counts[n]] for n in names], dtype=torch.float64, device=self.device
        )
        if self.groups.dp_size > 1:
            dist.all_reduce(stats, group=self.groups.dp_group)
        if self.pipelined:  # the last stage has the numbers; share them along the pipeline
            dist.broadcast(stats, src=self.groups.pp_ranks[-1], group=self.groups.pp_group)
        return {
            n: (float(stats[i, 0]), int(stats[i, 1]))
            for i, n in enumerate(names)
            if stats[i, 1] > 0
        }
