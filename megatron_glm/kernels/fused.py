"""Fused element-wise ops of the GLM layer, each next to its eager reference.

Shape legend: any leading shape ``[..., f]``; ``bias`` is ``[f]`` and broadcasts over the rest.

- ``bias_gelu(bias, y, impl)`` = GeLU-tanh(y + bias) (docs/model.md#architecture).
  ``impl="eager"`` is an autograd function with the analytic derivative, so backward keeps only
  ``bias`` and ``y`` instead of every intermediate of the tanh formula (less activation memory, but
  ~20% slower than plain autograd on CPU because backward recomputes the tanh); ``impl="compile"`` runs that function's
  forward and backward as ``torch.compile``d kernels (2.3-2.7x faster than the reference on CPU once
  compiled, but compiling costs 6-10 s per process); ``impl="reference"`` is plain autograd of the
  formula. ``auto``: ``compile`` on CUDA, ``reference`` on CPU (the fastest there without paying
  the compile in every short CPU run and test process).
- ``bias_dropout_add(x, bias, residual, p, training, impl)`` = residual + dropout(x + bias).
  ``auto``: compiled on CUDA, eager on CPU (compiled was ~3x slower there). The dropout draws from
  the default generator in both cases, so activation checkpointing's RNG restore covers it.

TorchScript was measured too: slower than eager on CPU for both ops (no CPU fuser), so it is unused.
Numbers: ``benchmarks/bench_fused.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "IMPLS",
    "bias_dropout_add",
    "bias_dropout_add_reference",
    "bias_gelu",
    "bias_gelu_reference",
]

IMPLS = ("auto", "reference", "eager", "compile")
_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2/pi), the tanh-GeLU constant
_CUBIC = 0.044715


def bias_gelu_reference(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """GLM's GeLU ``0.5x(1 + tanh(0.7978845608(x + 0.044715x^3)))`` with ``x = y + bias``."""
    x = y + bias
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x * x * x)))


def _gelu_grad(grad: torch.Tensor, bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh GeLU times ``grad``, recomputed from the saved inputs."""
    x = y + bias
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _CUBIC * x * x * x))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _CUBIC * x * x
    )
    return grad * slope


_kernels: dict[str, Callable[..., torch.Tensor]] = {}


def _kernel(name: str, fn: Callable[..., torch.Tensor], impl: str) -> Callable[..., torch.Tensor]:
    if impl in ("eager", "reference"):
        return fn
    # dynamic=True: one compile serves every batch/sequence shape.
    key = f"{name}:compile"
    if key not in _kernels:
        _kernels[key] = torch.compile(fn, dynamic=True)
    return _kernels[key]


def _resolve(impl: str, device: torch.device, cpu_default: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "compile" if device.type == "cuda" else cpu_default


class _BiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, y: torch.Tensor, impl: str) -> torch.Tensor:
        ctx.save_for_backward(bias, y)
        ctx.impl = impl
        return _kernel("gelu_fwd", bias_gelu_reference, impl)(bias, y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        bias, y = ctx.saved_tensors
        grad_y = _kernel("gelu_bwd", _gelu_grad, ctx.impl)(grad, bias, y)
        return grad_y.sum_to_size(bias.shape), grad_y, None


def bias_gelu(bias: torch.Tensor, y: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """GeLU-tanh(y + bias); ``impl`` in ``auto | reference | eager | compile`` (module doc)."""
    if bias.shape[-1:] != y.shape[-1:]:
        raise ValueError(
            f"bias {tuple(bias.shape)} does not match the last dim of y {tuple(y.shape)}"
        )
    impl = _resolve(impl, y.device, cpu_default="reference")
    if impl == "reference":
        return bias_gelu_reference(bias, y)
    return _BiasGeLU.apply(bias, y, impl)


def bias_dropout_add_reference(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """``residual + dropout(x + bias)`` in plain eager ops (``bias`` may be None)."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    prob: float,
    training: bool,
    impl: str = "auto",
) -> torch.Tensor:
    """Fused ``residual + dropout(x + bias)``; ``impl`` in ``auto | reference | eager | compile``
    (``reference`` and ``eager`` are the same plain ops)."""
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {prob}")
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    impl = _resolve(impl, x.device, cpu_default="eager")
    return _kernel("bias_dropout_add", bias_dropout_add_reference, impl)(
        x, bias, residual, prob, training
    )
