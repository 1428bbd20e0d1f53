"""The DeepSpeed JSON: read it, check it against the layout, and complete it for ``deepspeed.initialize``.

The JSON owns batch sizes, the optimizer, ZeRO, precision and gradient clipping. Rules we add:

- Batch arithmetic ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps
  * data_parallel_size``: any two of the three determine the third (one alone: the missing factor
  is 1 micro-batch of accumulation); the completed triple is written back.
- Peak learning rate: ``--lr`` if given, else ``optimizer.params.lr``; both with different values
  is an error (no silent override); neither is an error. The JSON's lr is set to the peak.
- No ``scheduler`` section: the GLM schedule (``lr_schedule.py``) is ours.
- Pipeline parallelism runs on DeepSpeed's ``PipelineEngine``, which supports ZeRO stages 0 and 1
  only; ZeRO-2/3 with ``--pipeline-model-parallel-size > 1`` is refused.
- fp16 needs CUDA, or a CPU for which DeepSpeed's CPU accelerator reports fp16 support (native fp16,
  AVX512-FP16 / AMX-FP16: ``torch.ops.mkldnn._is_mkldnn_fp16_supported()``); elsewhere
  ``deepspeed.initialize`` would fail with "Type fp16 is not supported on your device.", so we
  refuse it up front. bf16 and fp32 run anywhere.
- On CPU without optimizer offload, Adam/AdamW run as ``torch.optim`` (``torch_adam: true``)
  unless the JSON sets ``torch_adam``: DeepSpeed's FusedAdam would be JIT-compiled for the CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed prints its own progress every steps_per_print steps; we log ourselves.
_QUIET_STEPS_PER_PRINT = 2**31 - 1


@dataclass(frozen=True)
class ResolvedDSConfig:
    """The completed DeepSpeed config plus the values the trainer needs from it."""

    config: dict[str, Any]
    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    zero_stage: int
    precision: str  # "fp32", "bf16" or "fp16"
    peak_lr: float
    weight_decay: float
    gradient_clipping: float
    offload_optimizer: bool


def load_ds_json(path: str | Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Read the JSON; a problem message instead of an exception when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None, [f"DeepSpeed config {str(path)!r} does not exist"]
    except (OSError, json.JSONDecodeError) as err:
        return None, [f"DeepSpeed config {str(path)!r} cannot be read as JSON: {err}"]
    if not isinstance(raw, dict):
        return None, [f"DeepSpeed config {str(path)!r} must hold a JSON object"]
    return raw, []


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _resolve_batch(
    cfg: dict[str, Any], dp: int, problems: list[str]
) -> tuple[int, int, int] | None:
    train, micro, gas = (cfg.get(k) for k in _BATCH_KEYS)
    for key, value in zip(_BATCH_KEYS, (train, micro, gas)):
        if value is not None and not _positive_int(value):
            problems.append(f"DeepSpeed {key} must be a positive integer, got {value!r}")
            return None
    if train is None and micro is None:
        problems.append(
            "the DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu"
        )
        return None
    if train is not None and micro is not None and gas is not None:
        if train != micro * gas * dp:
            problems.append(
                f"batch arithmetic: train_batch_size ({train}) != train_micro_batch_size_per_gpu "
                f"({micro}) * gradient_accumulation_steps ({gas}) * data-parallel size ({dp}) "
                f"= {micro * gas * dp}"
            )
            return None
    elif train is not None and micro is not None:
        if train % (micro * dp):
            problems.append(
                f"batch arithmetic: train_batch_size ({train}) is not a multiple of "
                f"train_micro_batch_size_per_gpu ({micro}) * data-parallel size ({dp})"
            )
            return None
        gas = train // (micro * dp)
    elif train is not None:
        gas = gas or 1
        if train % (gas * dp):
            problems.append(
                f"batch arithmetic: train_batch_size ({train}) is not a multiple of "
                f"gradient_accumulation_steps ({gas}) * data-parallel size ({dp})"
            )
            return None
        micro = train // (gas * dp)
    else:
        gas = gas or 1
        train = micro * gas * dp
    return train, micro, gas


def resolve_ds_config(
    raw: dict[str, Any],
    *,
    data_parallel_size: int | None,
    pipeline_parallel_size: int,
    cli_lr: float | None,
    cuda: bool,
    cpu_fp16: bool = False,
) -> tuple[ResolvedDSConfig | None, list[str]]:
    """Check ``raw`` against the layout and complete it; ``(None, problems)`` when it is invalid.

    ``cpu_fp16``: DeepSpeed's CPU accelerator reports fp16 support on this machine (only read
    when ``cuda`` is False).

    ``data_parallel_size=None`` (the layout itself is invalid) skips the batch arithmetic but
    still reports every other problem.
    """
    problems: list[str] = []
    cfg = copy.deepcopy(raw)
    batch = None
    if data_parallel_size is not None:
        batch = _resolve_batch(cfg, data_parallel_size, problems)

    zero = cfg.get("zero_optimization") or {}
    zero_stage = zero.get("stage", 0)
    if zero_stage not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    elif zero_stage >= 2 and pipeline_parallel_size > 1:
        problems.append(
            f"ZeRO stage {zero_stage} with pipeline-model-parallel-size {pipeline_parallel_size}: "
            "DeepSpeed's PipelineEngine supports ZeRO stages 0 and 1 only"
        )
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    if offload and zero_stage == 0:
        problems.append(
            "zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3, got stage 0"
        )
    if (zero.get("offload_param") or {}).get("device", "none") not in (
        "none",
        None,
    ) and zero_stage != 3:
        problems.append(
            f"zero_optimization.offload_param needs ZeRO stage 3, got stage {zero_stage}"
        )

    fp16 = bool((cfg.get("fp16") or {}).get("enabled", False))
    bf16 = bool((cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled", False))
    if fp16 and bf16:
        problems.append("the DeepSpeed config enables both fp16 and bf16; pick one")
    if fp16 and not cuda and not cpu_fp16:
        problems.append(
            "fp16 needs a CUDA device or a CPU with native fp16: DeepSpeed's CPU accelerator "
            "refuses fp16 on this CPU ('Type fp16 is not supported on your device.'; "
            "torch.ops.mkldnn._is_mkldnn_fp16_supported() is False, it needs AVX512-FP16 or "
            "AMX-FP16); use bf16"
        )
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"

    if "scheduler" in cfg:
        problems.append(
            "the DeepSpeed config has a 'scheduler' section; remove it: the LR schedule is set by "
            "--lr/--min-lr/--lr-decay-style/--lr-decay-iters/--warmup"
        )
    optimizer = cfg.get("optimizer")
    peak_lr = float("nan")
    weight_decay = 0.0
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        problems.append(
            "the DeepSpeed config needs an 'optimizer' section with a 'type' (e.g. AdamW)"
        )
    else:
        params = optimizer.setdefault("params", {})
        json_lr = params.get("lr")
        if cli_lr is None and json_lr is None:
            problems.append("no learning rate: pass --lr or set optimizer.params.lr in the JSON")
        elif (
            cli_lr is not None and json_lr is not None and not math.isclose(cli_lr, float(json_lr))
        ):
            problems.append(
                f"--lr {cli_lr} and the DeepSpeed optimizer.params.lr {json_lr} disagree; give one"
            )
        else:
            peak_lr = float(cli_lr if cli_lr is not None else json_lr)
            if not (math.isfinite(peak_lr) and peak_lr > 0):
                problems.append(f"the learning rate must be positive, got {peak_lr}")
            params["lr"] = peak_lr
        weight_decay = float(params.get("weight_decay", 0.0))
        if weight_decay < 0:
            problems.append(f"optimizer.params.weight_decay must be >= 0, got {weight_decay}")
        if (
            not cuda
            and not offload
            and str(optimizer["type"]).lower() in ("adam", "adamw")
            and "torch_adam" not in params
        ):
            params["torch_adam"] = True

    clipping = cfg.get("gradient_clipping", 0.0)
    if not isinstance(clipping, (int, float)) or clipping < 0:
        problems.append(f"gradient_clipping must be a number >= 0, got {clipping!r}")
        clipping = 0.0

    if problems or batch is None or data_parallel_size is None:
        return None, problems
    train, micro, gas = batch
    cfg.update(dict(zip(_BATCH_KEYS, (train, micro, gas))))
    cfg.setdefault("steps_per_print", _QUIET_STEPS_PER_PRINT)
    return (
        ResolvedDSConfig(
            config=cfg,
            train_batch_size=train,
            micro_batch_size=micro,
            gradient_accumulation_steps=gas,
            data_parallel_size=data_parallel_size,
            zero_stage=zero_stage,
            precision=precision,
            peak_lr=peak_lr,
            weight_decay=weight_decay,
            gradient_clipping=float(clipping),
            offload_optimizer=offload,
        ),
        [],
    )
