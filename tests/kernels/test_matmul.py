"""16-bit products computed in fp32 (megatron_glm/kernels/matmul.py) against torch's own 16-bit
products and an fp64 reference, the choice between them, and a whole model in both ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.kernels import matmul as mm
from megatron_glm.model import glm_loss

BF16_ULP = 2.0**-7  # bf16 keeps 8 significant bits: one unit in the last place is <= 2^-7 relative


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_one_rounding_from(got: torch.Tensor, exact: torch.Tensor) -> None:
    """``got`` (16-bit) is within one rounding of the exact fp64 value, relative to the row's
    scale (sums of signed terms can cancel to near zero, where relative error means nothing)."""
    scale = exact.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    err = ((got.double() - exact) / scale).abs().max().item()
    assert err <= BF16_ULP, err


@pytest.fixture
def mode(monkeypatch: pytest.MonkeyPatch):
    def set_mode(value: str) -> None:
        monkeypatch.setenv(mm.ENV_VAR, value)

    return set_mode


def test_the_choice_follows_dtype_device_and_environment(mode) -> None:
    bf16, fp32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    mode("auto")
    assert mm.gemm_in_fp32(bf16) == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert not mm.gemm_in_fp32(fp32)
    mode("fp32")
    assert mm.gemm_in_fp32(bf16) and mm.gemm_in_fp32(bf16.half())
    assert not mm.gemm_in_fp32(fp32)
    mode("native")
    assert not mm.gemm_in_fp32(bf16)
    mode("fast")
    with pytest.raises(ValueError, match="MEGATRON_GLM_16BIT_GEMM='fast'"):
        mm.gemm_in_fp32(bf16)


@pytest.mark.parametrize("block_elements", [1 << 22, 1000])  # one block, and many small ones
def test_products_are_one_rounding_from_exact_and_agree_with_torch(
    mode, monkeypatch: pytest.MonkeyPatch, block_elements: int
) -> None:
    monkeypatch.setattr(mm, "_BLOCK_ELEMENTS", block_elements)
    mode("fp32")
    x, w, bias = _randn(3, 40, 96, seed=0), _randn(72, 96, seed=1), _randn(72, seed=2)
    a, b = _randn(2, 3, 40, 24, seed=3), _randn(2, 3, 24, 56, seed=4)
    got = {
        "linear": mm.linear_forward(x, w, bias),
        "linear no bias": mm.linear_forward(x, w),
        "rows @ matrix": mm.matmul(x, w.t()),
        "batched": mm.matmul(a, b),
        "batched, transposed view": mm.matmul(a, a.transpose(-1, -2)),
        "a^T b": mm.matmul_tn(x, x[..., :40]),
    }
    d = {name: t.double() for name, t in (("x", x), ("w", w), ("bias", bias), ("a", a), ("b", b))}
    exact = {
        "linear": d["x"] @ d["w"].t() + d["bias"],
        "linear no bias": d["x"] @ d["w"].t(),
        "rows @ matrix": d["x"] @ d["w"].t(),
        "batched": d["a"] @ d["b"],
        "batched, transposed view": d["a"] @ d["a"].transpose(-1, -2),
        "a^T b": d["x"].reshape(-1, 96).t() @ d["x"][..., :40].reshape(-1, 40),
    }
    mode("native")
    native = {
        "linear": F.linear(x, w, bias),
        "linear no bias": F.linear(x, w),
        "rows @ matrix": x @ w.t(),
        "batched": a @ b,
        "batched, transposed view": a @ a.transpose(-1, -2),
        "a^T b": mm.matmul_tn(x, x[..., :40]),
    }
    for name, value in got.items():
        assert value.dtype == torch.bfloat16 and value.shape == exact[name].shape, name
        _assert_one_rounding_from(value, exact[name])
        _assert_one_rounding_from(native[name], exact[name])
        torch.testing.assert_close(value, native[name], rtol=2 * BF16_ULP, atol=1e-2, msg=name)


def test_linear_gradients_equal_torch_linear_in_fp32_arithmetic(mode) -> None:
    """On exactly representable values the fp32 path's output and all three gradients equal
    ``F.linear``'s on the same values in fp32, rounded once to bf16."""
    mode("fp32")
    leaves = [_randn(4, 8, 32, seed=5), _randn(16, 32, seed=6), _randn(16, seed=7)]
    grad = _randn(4, 8, 16, seed=8)
    x, w, bias = (t.clone().requires_grad_() for t in leaves)
    out = mm.linear(x, w, bias)
    out.backward(grad)
    x32, w32, b32 = (t.float().requires_grad_() for t in leaves)
    ref = F.linear(x32, w32, b32)
    ref.backward(grad.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    for got, want in ((x.grad, x32.grad), (w.grad, w32.grad), (bias.grad, b32.grad)):
        assert got is not None and want is not None and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=BF16_ULP, atol=1e-3)


def test_fp32_weights_and_inputs_keep_torch_linear(mode) -> None:
    mode("fp32")
    x, w = _randn(3, 8, seed=9, dtype=torch.float32), _randn(4, 8, seed=10, dtype=torch.float32)
    torch.testing.assert_close(mm.linear(x, w), F.linear(x, w), rtol=0, atol=0)


def test_a_bf16_model_step_is_as_close_to_fp32_both_ways(mode) -> None:
    """A tiny GLM in bf16 (16-bit inputs take the fused attention backend), one step with torch's
    bf16 products and one with fp32-arithmetic products, against the same weights in fp32: the
    fp32-arithmetic step is at least as close to fp32 as torch's own bf16 step (both far closer
    than bf16's precision would allow for a wrong product)."""
    config = GLMConfig.from_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = GLMModel(config).to(torch.bfloat16).train()
    b, s = 2, 24
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=g)
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    pos[:, 0] = torch.arange(s).clamp(max=s // 2 - 1)
    pos[:, 1, s // 2 :] = torch.arange(1, s - s // 2 + 1)
    sep = torch.full((b,), s // 2)
    labels = torch.randint(0, config.vocab_size, (b, s), generator=g)
    loss_mask = (torch.arange(s) >= s // 2).float().expand(b, s)

    def step(net: GLMModel) -> tuple[float, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        loss = glm_loss(net(ids, pos, sep), labels, loss_mask, None, loss_mask.sum())
        loss.backward()
        grads = [p.grad.float().flatten() for p in net.parameters() if p.grad is not None]
        assert len(grads) == len(list(net.parameters()))
        return loss.item(), torch.cat(grads)

    mode("native")
    loss_native, grads_native = step(model)
    mode("fp32")
    loss_fp32, grads_fp32 = step(model)
    loss_ref, grads_ref = step(model.float())

    def error(grads: torch.Tensor) -> float:
        return ((grads - grads_ref).norm() / grads_ref.norm()).item()

    assert error(grads_fp32) <= 1.25 * error(grads_native) + 1e-3, (
        error(grads_fp32),
        error(grads_native),
    )
    assert error(grads_native) < 0.05  # bf16 noise, not a wrong gradient
    assert abs(loss_fp32 - loss_ref) <= 1.25 * abs(loss_native - loss_ref) + 1e-3


@pytest.mark.parametrize("weight_shape", [(24, 56), (2, 3, 24, 56)])
def test_matmul_gradients_equal_fp32_arithmetic(mode, weight_shape: tuple[int, ...]) -> None:
    mode("fp32")
    leaves = [_randn(2, 3, 40, 24, seed=12), _randn(*weight_shape, seed=13)]
    grad = _randn(2, 3, 40, 56, seed=14)
    a, b = (t.clone().requires_grad_() for t in leaves)
    out = mm.matmul(a, b)
    out.backward(grad)
    a32, b32 = (t.float().requires_grad_() for t in leaves)
    ref = torch.matmul(a32, b32)
    ref.backward(grad.float())
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    for got, want in ((a.grad, a32.grad), (b.grad, b32.grad)):
        assert got is not None and want is not None and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=BF16_ULP, atol=1e-3)
