"""Fused element-wise ops of the GLM layer, each next to its eager reference.

Shape legend: any leading shape ``[..., f]``; ``bias`` is ``[f]`` and broadcasts over the rest.

- ``bias_gelu(bias, y, impl)`` = GeLU-tanh(y + bias) (docs/model.md#architecture).
  ``impl="aten"`` is torch's own tanh-GeLU kernel (``F.gelu(approximate="tanh")``) after the bias
  add: one vectorised pass forward and one backward, computed in fp32 for bf16 inputs, 1.8x (bf16)
  to 2.9x (fp32) faster than the reference on CPU. ``impl="eager"`` is an autograd function with
  the analytic derivative (backward keeps only ``bias`` and ``y``); ``impl="compile"`` runs that
  function's forward and backward as ``torch.compile``d kernels (compiling costs 6-10 s per
  process); ``impl="reference"`` is plain autograd of the formula. ``auto``: ``compile`` on CUDA,
  ``aten`` on CPU. ``aten`` and the formula agree to float rounding (2.4e-7 in fp32), not bit for
  bit.
- ``bias_dropout_add(x, bias, residual, p, training, impl)`` = residual + dropout(x + bias).
  ``eager`` (``auto`` on CPU) draws the mask with ``dropout.keep_bits`` and applies it as a
  bitwise AND in place, then adds ``scale * y`` to the residual in one op; ``compile`` (``auto`` on
  CUDA) is the compiled reference; ``reference`` is ``F.dropout``. All draw from the default
  generator, so activation checkpointing's RNG restore covers them, but each draws different
  masks for the same seed.

TorchScript was measured too: slower than eager on CPU for both ops (no CPU fuser), so it is unused.
Numbers: ``benchmarks/bench_fused.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from megatron_glm.kernels.dropout import apply_keep_bits_, keep_bits

logger = logging.getLogger(__name__)

__all__ = [
    "IMPLS",
    "bias_dropout_add",
    "bias_dropout_add_reference",
    "bias_gelu",
    "bias_gelu_reference",
]

IMPLS = ("auto", "reference", "aten", "eager", "compile")
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
    impl = _resolve(impl, y.device, cpu_default="aten")
    if impl == "reference":
        return bias_gelu_reference(bias, y)
    if impl == "aten":
        return F.gelu(y + bias, approximate="tanh")
    return _BiasGeLU.apply(bias, y, impl)


def bias_dropout_add_reference(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    """``residual + dropout(x + bias)`` in plain eager ops (``bias`` may be None)."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


class _KeepBits(torch.autograd.Function):
    """``y`` with the elements ``bits`` drops zeroed, in place; the gradient is masked alike."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(bits)
        return apply_keep_bits_(y, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (bits,) = ctx.saved_tensors
        return apply_keep_bits_(grad.clone(), bits), None


def _bias_dropout_add_eager(
    x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    if not training or prob == 0.0:
        return residual + (x + bias if bias is not None else x)
    y = x + bias if bias is not None else x.clone()  # a fresh tensor: the mask goes in place
    bits, scale = keep_bits(y.shape, prob, y.dtype, y.device)
    return torch.add(residual, _KeepBits.apply(y, bits), alpha=scale)


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    prob: float,
    training: bool,
    impl: str = "auto",
) -> torch.Tensor:
    """Fused ``residual + dropout(x + bias)``; ``impl`` in ``auto | reference | eager | compile``
    (``aten`` means ``eager`` here; module doc)."""
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {prob}")
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    impl = _resolve(impl, x.device, cpu_default="eager")
    if impl in ("eager", "aten"):
        return _bias_dropout_add_eager(x, bias, residual, prob, training)
    return _kernel("bias_dropout_add", bias_dropout_add_reference, impl)(
        x, bias, residual, prob, training
    )
