"""Bitwise dropout masks (megatron_glm/kernels/dropout.py): the drop rate, the rounding of p, lanes
that are independent and uniform, reproducibility from the generator state, exact application."""

from __future__ import annotations

import pytest
import torch

from megatron_glm.kernels.dropout import (
    DROPOUT_LEVELS,
    apply_keep_bits_,
    dropout_levels,
    keep_bits,
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_per_lane_and_scale(dtype: torch.dtype, p: float) -> None:
    torch.manual_seed(0)
    bits, scale = keep_bits((1 << 18, 4), p, dtype)
    assert bits.dtype.itemsize == dtype.itemsize and bits.shape == (1 << 18, 4)
    assert set(bits.unique().tolist()) == {0, -1}  # all zeros or all ones, nothing else
    dropped = (bits == 0).double()
    rounded = dropout_levels(p) / DROPOUT_LEVELS
    assert abs(rounded - p) <= 0.5 / DROPOUT_LEVELS
    assert scale == 1.0 / (1.0 - rounded)
    # 2^18 draws per column: binomial standard deviation <= 0.001, so 0.005 is > 5 sigma; every
    # column is a different lane of the 64-bit draws (the sign-bit lane included)
    for column in dropped.mean(dim=0).tolist():
        assert abs(column - rounded) < 0.005, (column, rounded)


def test_lanes_are_uncorrelated() -> None:
    torch.manual_seed(1)
    bits, _ = keep_bits((1 << 18, 4), 0.5, torch.bfloat16)
    dropped = (bits == 0).double()
    both = (dropped[:, :-1] * dropped[:, 1:]).mean(dim=0)  # neighbouring lanes of one draw
    assert torch.allclose(both, torch.full_like(both, 0.25), atol=0.005), both


def test_reproducible_from_the_default_generator_and_advances_it() -> None:
    torch.manual_seed(7)
    first, _ = keep_bits((5, 7), 0.3, torch.float32)
    second, _ = keep_bits((5, 7), 0.3, torch.float32)
    torch.manual_seed(7)
    again, _ = keep_bits((5, 7), 0.3, torch.float32)
    replay = torch.Generator().manual_seed(7)
    from_generator, _ = keep_bits((5, 7), 0.3, torch.float32, generator=replay)
    assert torch.equal(first, again) and torch.equal(first, from_generator)
    assert not torch.equal(first, second)


def test_apply_keeps_bits_exactly_and_zeroes_the_rest() -> None:
    x = torch.randn(64, 33, dtype=torch.float64)
    torch.manual_seed(3)
    bits, _ = keep_bits(x.shape, 0.4, x.dtype)
    out = apply_keep_bits_(x.clone(), bits)
    kept = bits != 0
    assert torch.equal(out[kept], x[kept])
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    assert not torch.signbit(out[~kept]).any()  # +0.0, not -0.0


def test_p_zero_keeps_everything_and_bad_arguments_raise() -> None:
    bits, scale = keep_bits((3, 3), 0.0, torch.bfloat16)
    assert (bits == -1).all() and scale == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\).*1.0"):
        keep_bits((3,), 1.0, torch.float32)
    with pytest.raises(ValueError, match="float dtype.*torch.int32"):
        keep_bits((3,), 0.1, torch.int32)
