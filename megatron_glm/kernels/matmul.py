"""Matrix products of 16-bit tensors on CPUs without 16-bit matrix instructions.

torch multiplies bf16 matrices on the CPU through oneDNN when the CPU has AVX512 (oneDNN then uses
AVX512-BF16 or AMX where present). On a CPU with AVX2 only, torch 2.13 falls back to its own
unvectorised loop: measured on an AVX2-only AMD EPYC, a [1024, 512] x [512, 1536] bf16 product ran
at 1.3 GFLOP/s against 63 GFLOP/s in fp32, so a bf16 model was about 40x slower than the same model
in fp32 (benchmarks/README.md). There the products here convert their bf16 operands to fp32 (exact),
multiply in fp32 and round the result to bf16 once, which is what a native bf16 GEMM computes (it
too accumulates in fp32; only the order of the additions may differ): 28x faster than torch's
fallback on that machine, while activations, saved tensors, weights and gradients all stay bf16.

The fp32 copies are made a block of rows (or of the batch) at a time, so the transient memory stays
within about ``_BLOCK_ELEMENTS`` fp32 values per operand however large the product is (the tied LM
head's ``[t, v]`` logits, the ``[b, n, s, s]`` attention scores).

The choice is made per call from the operands: CPU, bf16 or fp16, and torch's oneDNN without
16-bit support for that dtype (``torch.ops.mkldnn._is_mkldnn_bf16_supported``). The environment
variable ``MEGATRON_GLM_16BIT_GEMM`` overrides it: ``native`` always uses torch's own 16-bit
product, ``fp32`` always converts, ``auto`` (the default) decides as above.

Shape legend: t rows (tokens), i input features, o output features, B batch of matrices, m/k/n the
matrix dimensions.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "gemm_in_fp32", "linear", "linear_forward", "matmul", "matmul_tn"]

ENV_VAR = "MEGATRON_GLM_16BIT_GEMM"
_MODES = ("auto", "native", "fp32")
# fp32 values converted at a time per operand (16 MB): large enough that the products stay
# GEMM-bound, small against the activations of a step.
_BLOCK_ELEMENTS = 1 << 22


@functools.cache
def _torch_has_16bit_gemm(dtype: torch.dtype) -> bool:
    mkldnn = torch.ops.mkldnn
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        native = bool(getattr(mkldnn, check)())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: the slow loop
        native = False
    if not native:
        name = str(dtype).removeprefix("torch.")
        logger.info(
            "torch has no fast %s matrix product on this CPU (capability %s): %s products are "
            "computed in fp32 and rounded once, so %s saves memory here, not time (%s=native "
            "to use torch's own)",
            name,
            torch.backends.cpu.get_cpu_capability(),
            name,
            name,
            ENV_VAR,
        )
    return native


def gemm_in_fp32(t: torch.Tensor) -> bool:
    """Whether products of ``t`` (bf16/fp16 on the CPU) are computed in fp32 here (module doc)."""
    if t.device.type != "cpu" or t.dtype not in (torch.bfloat16, torch.float16):
        return False
    mode = os.environ.get(ENV_VAR, "auto")
    if mode not in _MODES:
        raise ValueError(f"{ENV_VAR}={mode!r}: expected one of {', '.join(_MODES)}")
    if mode != "auto":
        return mode == "fp32"
    return not _torch_has_16bit_gemm(t.dtype)


def _blocks(total: int, per_item: int) -> list[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(1, per_item))
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def _matmul_values(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`matmul`'s values, without autograd. ``bias [n]`` is for :func:`linear_forward`'s fp32
    path (a 2-D ``b``): added in fp32 before the one rounding, as a native GEMM adds it."""
    fp32 = gemm_in_fp32(a)
    assert bias is None or (b.dim() == 2 and fp32), "bias: linear_forward's fp32 path only"
    if not fp32:
        return torch.matmul(a, b)
    if b.dim() == 2:  # rows of a against one matrix (a linear layer)
        rows = a.reshape(-1, a.shape[-1])  # [t, k]
        out = a.new_empty(rows.shape[0], b.shape[1])  # [t, n]
        weight = b.float()
        for block in _blocks(rows.shape[0], max(rows.shape[1], b.shape[1])):
            if bias is None:
                out[block] = torch.mm(rows[block].float(), weight)
            else:
                out[block] = torch.addmm(bias.float(), rows[block].float(), weight)
        return out.view(*a.shape[:-1], b.shape[1])
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"matmul: batch dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
    a3 = a.reshape(-1, *a.shape[-2:])  # [B, m, k]
    b3 = b.reshape(-1, *b.shape[-2:])  # [B, k, n]
    m, k, n = a3.shape[1], a3.shape[2], b3.shape[2]
    out = a.new_empty(a3.shape[0], m, n)  # [B, m, n]
    for block in _blocks(a3.shape[0], max(m * k, k * n, m * n)):
        out[block] = torch.bmm(a3[block].float(), b3[block].float())
    return out.view(*a.shape[:-1], n)


class _Fp32ComputeMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _matmul_values(a, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        grad_a = _matmul_values(grad, b.transpose(-1, -2)) if need_a else None
        if not need_b:
            return grad_a, None
        if b.dim() == 2:
            return grad_a, matmul_tn(a, grad)
        return grad_a, _matmul_values(a.transpose(-1, -2), grad)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` for ``a [.., m, k]`` and either ``b [k, n]`` or ``b`` with ``a``'s
    leading dimensions ``[.., k, n]``; computed in fp32 and rounded once where
    :func:`gemm_in_fp32` says so (with autograd when an operand needs a gradient)."""
    if not gemm_in_fp32(a) or a.dtype != b.dtype:
        return torch.matmul(a, b)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _Fp32ComputeMatmul.apply(a, b)
    return _matmul_values(a, b)


def matmul_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T b`` over rows, without autograd: ``a [.., m]`` and ``b [.., n]`` with the same leading
    dimensions -> ``[m, n]`` (a linear layer's weight gradient ``grad^T x``). In fp32 the rows are
    summed a block at a time into one fp32 ``[m, n]`` result."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [t, m], [t, n]
    if not gemm_in_fp32(a):
        return a2.t().matmul(b2)
    total = a2.new_zeros(a2.shape[1], b2.shape[1], dtype=torch.float32)  # [m, n]
    for block in _blocks(a2.shape[0], max(a2.shape[1], b2.shape[1])):
        total.addmm_(a2[block].t().float(), b2[block].float())
    return total.to(a.dtype)


def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x [.., i], weight [o, i], bias [o])`` without autograd; in fp32 where
    :func:`gemm_in_fp32` says so, the bias added before the one rounding (as a native GEMM does)."""
    if not gemm_in_fp32(x):
        return F.linear(x, weight, bias)
    return _matmul_values(x, weight.t(), bias)  # [.., o]


class _Fp32ComputeLinear(torch.autograd.Function):
    """A linear layer whose three products (output, input gradient, weight gradient) run in fp32
    a block at a time; saves what ``F.linear`` saves."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear_forward(x, weight, bias)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = _matmul_values(grad, weight) if need_x else None  # [.., i]
        grad_weight = matmul_tn(grad, x) if need_weight else None  # [o, i]
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with autograd, computed in fp32 for 16-bit CPU tensors where torch has no fast
    16-bit product (module doc); plain ``F.linear`` everywhere else."""
    if gemm_in_fp32(x) and x.dtype == weight.dtype:
        return _Fp32ComputeLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
