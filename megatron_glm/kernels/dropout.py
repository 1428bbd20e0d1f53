"""Dropout as a bitwise AND: masks from 15 random bits per element, applied on the integer view.

``torch.nn.functional.dropout`` on CPU draws one Bernoulli sample per element through the
Mersenne twister, then multiplies by the mask and by the scale; bool masks are not vectorised
either (``masked_fill_``/``mul_`` with a bool mask run at ~1.5 GB/s). On the benchmark model that
was a third of a bf16 training step (benchmarks/README.md). Here instead:

- ``keep_bits`` fills an int64 buffer with full-range 64-bit draws from a torch generator (the
  *current default generator* unless one is given, so the model-parallel RNG tracker's ``fork()``,
  activation checkpointing's RNG restore and checkpointed RNG states cover it exactly as they
  cover ``F.dropout``) and reads it as lanes as wide as the activation's elements (4 lanes per draw
  for bf16/fp16, 2 for fp32: never more than one draw per element). Four vectorised integer ops
  turn each lane into an all-ones (keep) or all-zeros (drop) word;
- ``apply_keep_bits_`` ANDs an activation's bit pattern with them in place: a kept element is
  unchanged, a dropped one becomes +0.0. The ``1 / (1 - p)`` scale is left to the caller, which
  can apply it where it is cheapest (on an output that is smaller, or fused into an add).

A lane's top 15 bits decide, so the drop probability is rounded to a multiple of ``2**-15``
(0.1 becomes 3277/32768 = 0.100006) and the returned scale uses that rounded value, which keeps
the expectation exact. The masks differ from ``F.dropout``'s for the same seed (different draws).
"""

from __future__ import annotations

import torch

__all__ = ["DROPOUT_LEVELS", "apply_keep_bits_", "dropout_levels", "keep_bits"]

_BITS = 15
DROPOUT_LEVELS = 1 << _BITS  # the drop probability is a multiple of 1 / DROPOUT_LEVELS
_LANE_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def dropout_levels(p: float) -> int:
    """How many of the ``DROPOUT_LEVELS`` equally likely lane values are dropped for ``p``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * DROPOUT_LEVELS)


def _lane_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point or dtype.itemsize not in _LANE_DTYPES:
        raise ValueError(f"bitwise dropout needs a 2-, 4- or 8-byte float dtype, got {dtype}")
    return _LANE_DTYPES[dtype.itemsize]


def keep_bits(
    shape: tuple[int, ...] | torch.Size,
    p: float,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """``(bits, scale)``: an integer tensor of ``shape`` as wide as ``dtype`` holding all ones
    (keep, probability ``1 - p``) or zero (drop), and the ``1 / (1 - p)`` for what is kept."""
    dropped = dropout_levels(p)
    lanes_dtype = _lane_dtype(dtype)
    numel = 1
    for size in shape:
        numel *= size
    per_draw = 8 // lanes_dtype.itemsize
    # from=int64 min, to=None: full 64-bit draws, so every lane is uniform (a plain random_()
    # leaves the sign bit of each draw 0).
    draws = torch.empty((numel + per_draw - 1) // per_draw, dtype=torch.int64, device=device)
    draws.random_(-(1 << 63), None, generator=generator)
    lanes = draws.view(lanes_dtype)[:numel].view(shape)
    width = lanes_dtype.itemsize * 8
    # lane >> (width - 15) is uniform on [-2^14, 2^14); minus (dropped - 2^14) it is negative for
    # exactly `dropped` of the 2^15 values; >> 15 then gives -1 there and 0 elsewhere; ~ flips.
    lanes.bitwise_right_shift_(width - _BITS)
    lanes.sub_(dropped - (1 << (_BITS - 1)))
    lanes.bitwise_right_shift_(_BITS)
    lanes.bitwise_not_()
    return lanes, DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped)


def apply_keep_bits_(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x`` with its dropped elements set to +0.0, in place (``bits`` from ``keep_bits``)."""
    x.view(bits.dtype).bitwise_and_(bits)
    return x
