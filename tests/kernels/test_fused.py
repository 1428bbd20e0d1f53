"""Fused ops against their eager references (and the references against torch's own ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_glm.kernels import (
    bias_dropout_add,
    bias_dropout_add_reference,
    bias_gelu,
    bias_gelu_reference,
)


def _leaves(
    *shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(*s, generator=g)).to(dtype).requires_grad_() for s in shapes]


def test_reference_gelu_is_the_tanh_approximation() -> None:
    bias, y = _leaves((16,), (3, 5, 16))
    torch.testing.assert_close(
        bias_gelu_reference(bias, y), F.gelu(y + bias, approximate="tanh"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("impl", ["eager", "compile"])
def test_bias_gelu_matches_reference_fp32(impl: str) -> None:
    bias, y = _leaves((16,), (3, 5, 16))
    out = bias_gelu(bias, y, impl=impl)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [bias, y])
    ref = bias_gelu_reference(bias, y)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [bias, y])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bias_gelu_bf16_within_tolerance() -> None:
    # bf16: relative step 2**-8; the fused backward evaluates the analytic derivative, autograd
    # differentiates the rounded chain, so both sit within a few bf16 steps: rtol/atol 2e-2.
    bias, y = _leaves((16,), (4, 16), dtype=torch.bfloat16)
    out = bias_gelu(bias, y, impl="eager")
    ref = bias_gelu_reference(bias, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(out.float().sum(), [bias, y])
    want = torch.autograd.grad(ref.float().sum(), [bias, y])
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("training,prob", [(True, 0.0), (False, 0.3)])
def test_bias_dropout_add_without_dropout_is_the_sum(training: bool, prob: float) -> None:
    x, bias, residual = _leaves((2, 3, 8), (8,), (2, 3, 8))
    out = bias_dropout_add(x, bias, residual, prob, training)
    torch.testing.assert_close(out, bias_dropout_add_reference(x, bias, residual, prob, training))
    torch.testing.assert_close(out, residual + x + bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_dropout_add_with_dropout_uses_the_bitwise_mask(dtype: torch.dtype) -> None:
    """residual + mask * scale * (x + bias) with the mask keep_bits draws for the same seed, and
    the gradients of that expression (x and bias through the mask, residual untouched)."""
    from megatron_glm.kernels.dropout import keep_bits

    x, bias, residual = _leaves((4, 5, 16), (16,), (4, 5, 16), dtype=dtype)
    torch.manual_seed(5)
    out = bias_dropout_add(x, bias, residual, 0.3, True)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype)
    grads = torch.autograd.grad((out * weights).sum(), [x, bias, residual])
    torch.manual_seed(5)
    bits, scale = keep_bits(x.shape, 0.3, dtype)
    kept = bits != 0
    assert 0 < kept.sum() < kept.numel()
    x_, bias_, residual_ = (t.detach().clone().requires_grad_() for t in (x, bias, residual))
    ref = residual_ + (x_ + bias_) * kept * scale
    want = torch.autograd.grad((ref * weights).sum(), [x_, bias_, residual_])
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, ref, **tol)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, **tol)


def test_aten_gelu_matches_reference() -> None:
    bias, y = _leaves((16,), (3, 5, 16))
    out = bias_gelu(bias, y, impl="aten")
    grads = torch.autograd.grad(out.sum(), [bias, y])
    ref = bias_gelu_reference(bias, y)
    want = torch.autograd.grad(ref.sum(), [bias, y])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bias_dropout_add_compiled_without_dropout() -> None:
    # The compiled kernel draws its dropout mask from a different random stream than eager, so
    # it is compared where no randomness is involved.
    x, bias, residual = _leaves((2, 3, 8), (8,), (2, 3, 8))
    out = bias_dropout_add(x, bias, residual, 0.1, False, impl="compile")
    torch.testing.assert_close(out, residual + x + bias, rtol=1e-6, atol=1e-6)


def test_fused_ops_validate_arguments() -> None:
    x, bias, residual = _leaves((2, 8), (8,), (2, 8))
    with pytest.raises(ValueError, match="impl must be one of"):
        bias_gelu(bias, x, impl="jit")
    with pytest.raises(ValueError, match=r"bias \(4,\)"):
        bias_gelu(bias[:4], x)
    with pytest.raises(ValueError, match="in \\[0, 1\\), got 1.5"):
        bias_dropout_add(x, bias, residual, 1.5, True)
    with pytest.raises(ValueError, match="residual"):
        bias_dropout_add(x, bias, residual[:1], 0.1, True)
