"""Support for the fp16 trainer test.

``simulate_cpu_fp16()`` makes DeepSpeed's CPU accelerator report fp16 support, as it does on a CPU
with native fp16 (AVX512-FP16 / AMX-FP16); the test machine has none, so DeepSpeed would refuse
fp16 before training. Only that capability query changes: the fp16 parameters, torch's CPU fp16
kernels and DeepSpeed's loss scaler all run for real. The test loads it from a ``sitecustomize``
on ``PYTHONPATH`` because the configuration check runs before the trainer's hooks.

``record_params`` (``MEGATRON_GLM_HOOKS=tests.training.fp16_hooks:record_params``) appends one
JSON line per iteration to ``$FP16_PARAM_LOG.rank<r>``: the iteration and a digest of this rank's
parameters after the update, so the test can see which updates changed the model.
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


def record_params(hooks: Any) -> None:
    import torch
    import torch.distributed as dist

    from megatron_glm.training.engine import Trainer

    path = f"{os.environ['FP16_PARAM_LOG']}.rank{dist.get_rank()}"
    train_step = Trainer.train_step
    iteration = 0

    def recording_step(self: Trainer, micro_batches: Any) -> Any:
        nonlocal iteration
        stats = train_step(self, micro_batches)
        iteration += 1
        digest = hashlib.sha256()
        dtypes = set()
        for param in self.engine.module.parameters():
            dtypes.add(str(param.dtype))
            digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
        with open(path, "a", encoding="utf-8") as f:
            record = {
                "iteration": iteration,
                "digest": digest.hexdigest(),
                "dtypes": sorted(dtypes),
            }
            f.write(json.dumps(record) + "\n")
        return stats

    Trainer.train_step = recording_step  # type: ignore[method-assign]
