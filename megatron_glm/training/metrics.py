"""What the loop reports: throughput, FLOPs and MFU, memory, and the four outputs (console,
TensorBoard, ``--log-json`` lines, a tqdm bar), all written by global rank 0 only.

FLOPs are *model* FLOPs (activation recomputation not counted, as in the MFU of the PaLM paper):
per token, forward ``L * (8 h^2 + 4 h f + 4 s h) + 2 h V`` (QKV + dense, MLP, attention scores
and context, the LM head), training = 3 x forward. MFU = achieved model TFLOP/s per device /
peak TFLOP/s per device; the peak is ``--peak-tflops``, else the dense bf16/fp16 figure of a known
GPU, else MFU is not reported (CPUs).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_glm.config.model import GLMConfig

logger = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) by substring of the device name.
_KNOWN_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("V100", 125.0),
)


def flops_per_token(config: GLMConfig, seq_length: int) -> float:
    """Training model FLOPs per input token (forward + backward = 3 x forward)."""
    h, f, n_layers = config.hidden_size, config.ffn_hidden_size, config.num_layers
    assert f is not None
    forward = (
        n_layers * (8 * h * h + 4 * h * f + 4 * seq_length * h) + 2 * h * config.padded_vocab_size
    )
    return 3.0 * forward


def device_peak_tflops(override: float | None) -> float | None:
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in _KNOWN_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def memory_gib() -> dict[str, float]:
    """Peak memory of this process: CUDA allocator peak on GPUs, else the peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"max_rss_gib": peak * scale / 2**30}


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become null (strict JSON); ``loss_hex`` keeps the exact value."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


class TrainLogger:
    """Console + TensorBoard + JSON lines + progress bar. Inactive on ranks other than 0."""

    def __init__(
        self,
        *,
        rank: int,
        log_json: str | None,
        tensorboard_dir: str | None,
        progress_bar: bool,
        start_iteration: int,
        stop_iteration: int,
    ) -> None:
        self.active = rank == 0
        self._json = None
        self._tb = None
        self._bar = None
        if not self.active:
            return
        if log_json:
            Path(log_json).parent.mkdir(parents=True, exist_ok=True)
            self._json = open(log_json, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if progress_bar and stop_iteration > start_iteration:
            from tqdm import tqdm

            self._bar = tqdm(
                total=stop_iteration,
                initial=start_iteration,
                desc="train",
                unit="it",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def advance(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log_train(self, record: dict[str, Any]) -> None:
        """``record`` has at least step, loss, lr; floats are also written as exact hex."""
        if not self.active:
            return
        step = record["step"]
        parts = [f"iteration {step}", f"loss {record['loss']:.6f}", f"lr {record['lr']:.4e}"]
        if record.get("grad_norm") is not None:
            parts.append(f"grad norm {record['grad_norm']:.4f}")
        if record.get("loss_scale") is not None:
            parts.append(f"loss scale {record['loss_scale']:g}")
        parts.append(f"skipped {record.get('skipped_steps', 0)}")
        if record.get("tokens_per_s") is not None:
            parts.append(f"{record['tokens_per_s']:.1f} tok/s")
        if record.get("tflops") is not None:
            parts.append(f"{record['tflops']:.2f} TFLOP/s/dev")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        mem = record.get("memory") or {}
        if mem:
            parts.append(" ".join(f"{k} {v:.2f}" for k, v in mem.items()))
        message = " | ".join(parts)
        if self._bar is not None:
            self._bar.write(message)
        logger.info(message)
        if self._tb is not None:
            for key in (
                "loss",
                "lr",
                "grad_norm",
                "loss_scale",
                "tokens_per_s",
                "tflops",
                "mfu",
                "skipped_steps",
            ):
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
            self._tb.flush()
        self._write_json({"kind": "train", **record, "loss_hex": float(record["loss"]).hex()})

    def log_eval(self, step: int, losses: dict[str, float], tokens: dict[str, int]) -> None:
        if not self.active:
            return
        shown = ", ".join(
            f"{name} {value:.6f} ({tokens[name]} tok)" for name, value in losses.items()
        )
        message = f"validation at iteration {step}: {shown}"
        if self._bar is not None:
            self._bar.write(message)
        logger.info(message)
        if self._tb is not None:
            for name, value in losses.items():
                self._tb.add_scalar(f"valid/loss_{name}", value, step)
            self._tb.flush()
        self._write_json({"kind": "eval", "step": step, "losses": losses, "tokens": tokens})

    def log_metrics(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """A finetuning task's evaluation (accuracy, F1, ROUGE, loss ...) of ``split``."""
        if not self.active:
            return
        shown = ", ".join(f"{name} {value:.6f}" for name, value in metrics.items())
        message = f"{split} at iteration {step}: {shown}"
        if self._bar is not None:
            self._bar.write(message)
        logger.info(message)
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", value, step)
            self._tb.flush()
        self._write_json({"kind": split, "step": step, "metrics": metrics})

    def _write_json(self, obj: dict[str, Any]) -> None:
        if self._json is None:
            return
        self._json.write(json.dumps(_json_safe(obj), allow_nan=False) + "\n")
        self._json.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._json is not None:
            self._json.close()
