"""Support for the fp16 trainer tests.

``simulate_cpu_fp16()`` makes DeepSpeed's CPU accelerator report fp16 support, as it does on a CPU
with native fp16 (AVX512-FP16 / AMX-FP16); the test machine has none, so DeepSpeed would refuse
fp16 before training. Only that capability query changes: the fp16 parameters, torch's CPU fp16
kernels and DeepSpeed's loss scaler all run for real. The test loads it from a ``sitecustomize``
on ``PYTHONPATH`` because the configuration check runs before the trainer's hooks.

``simulate_deepspeed_stage0_loss_scaling()`` (also from ``sitecustomize``) makes
``DeepSpeedEngine.backward`` multiply the loss by the stage-0 fp16 optimizer's loss scale, as
DeepSpeed does with the fix of upstream pull request 8393: the trainer must then not scale again.

``simulate_fused_fp16_optimizer()`` (also from ``sitecustomize``) makes DeepSpeed take
``torch.optim.AdamW`` for its FusedAdam, so that at ZeRO stage 0 it wraps it in ``FP16_Optimizer``
(what CUDA runs get with the default FusedAdam) instead of ``FP16_UnfusedOptimizer``; FusedAdam
itself needs CUDA.

``record_params`` (``MEGATRON_GLM_HOOKS=tests.training.fp16_hooks:record_params``) appends one
JSON line per iteration to ``$FP16_PARAM_LOG.rank<r>``: the iteration and a digest of this rank's
parameters after the update, so the test can see which updates changed the model, and at ZeRO
stage 0 the divisor by which DeepSpeed's fp16 optimizer unscaled and clipped the gradients
(``unscale_and_clip_grads``; null when it did not get there). It also saves
this rank's parameters (as fp32) before the first iteration and after each one, as
``$FP16_PARAM_LOG.rank<r>.iter<k>.safetensors`` (``k`` = 0 for the initial ones).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def simulate_cpu_fp16() -> None:
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True  # type: ignore[method-assign]
    CPU_Accelerator.supported_dtypes = lambda self: [  # type: ignore[method-assign]
        torch.float,
        torch.bfloat16,
        torch.float16,
    ]


def simulate_deepspeed_stage0_loss_scaling() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    backward = DeepSpeedEngine.backward

    def scaling_backward(self: DeepSpeedEngine, loss: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
            loss = loss.float() * self.optimizer.loss_scale
        return backward(self, loss, *args, **kwargs)

    DeepSpeedEngine.backward = scaling_backward  # type: ignore[method-assign]


def simulate_fused_fp16_optimizer() -> None:
    import torch
    from deepspeed.runtime import engine

    # engine.py picks FP16_Optimizer when the optimizer is a FusedAdam
    engine.FusedAdam = torch.optim.AdamW  # type: ignore[misc]


def record_params(hooks: Any) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_glm.training.engine import Trainer

    path = f"{os.environ['FP16_PARAM_LOG']}.rank{dist.get_rank()}"
    train_step = Trainer.train_step
    iteration = 0

    def save(trainer: Trainer) -> tuple[str, list[str]]:
        digest = hashlib.sha256()
        dtypes = set()
        tensors = {}
        for name, param in trainer.engine.module.named_parameters():
            dtypes.add(str(param.dtype))
            tensors[name] = param.detach().to(torch.float32).contiguous().clone()
            digest.update(tensors[name].numpy().tobytes())
        save_file(tensors, f"{path}.iter{iteration}.safetensors")
        return digest.hexdigest(), sorted(dtypes)

    divisors: list[float] = []

    def record_clip_divisor(optimizer: Any) -> None:
        unscale_and_clip = optimizer.unscale_and_clip_grads

        def recording(*args: Any, **kwargs: Any) -> Any:
            divisor = unscale_and_clip(*args, **kwargs)
            divisors.append(float(divisor))
            return divisor

        optimizer.unscale_and_clip_grads = recording

    def recording_step(self: Trainer, micro_batches: Any) -> Any:
        nonlocal iteration
        if iteration == 0:
            save(self)
            if self.fp16_stage0:
                record_clip_divisor(self.engine.optimizer)
        divisors.clear()
        stats = train_step(self, micro_batches)
        iteration += 1
        digest, dtypes = save(self)
        with open(path, "a", encoding="utf-8") as f:
            record = {
                "iteration": iteration,
                "digest": digest,
                "dtypes": dtypes,
                "clip_divisor": divisors[-1] if divisors else None,
            }
            f.write(json.dumps(record) + "\n")
        return stats

    Trainer.train_step = recording_step  # type: ignore[method-assign]
