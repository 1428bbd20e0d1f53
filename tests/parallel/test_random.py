"""RNG tracker, seeding, activation checkpointing and whole-process RNG snapshots (one process)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_glm.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    checkpoint,
    get_all_rng_states,
    get_rng_tracker,
    model_parallel_seed,
    set_all_rng_states,
)


def test_fork_draws_from_its_own_stream_and_leaves_default_alone() -> None:
    tracker = RNGStatesTracker(cuda=False)
    tracker.add("a", 7)
    torch.manual_seed(0)
    expected_default = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(4)
    assert torch.equal(torch.rand(4), expected_default)  # default stream not advanced
    with tracker.fork("a"):
        second = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(torch.cat([first, second]), torch.rand(8))  # one continued stream


def test_tracker_states_round_trip_and_errors() -> None:
    tracker = RNGStatesTracker(cuda=False)
    tracker.add("a", 1)
    saved = tracker.get_states()
    with tracker.fork("a"):
        drawn = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), drawn)
    assert tracker.names() == ["a"]
    with pytest.raises(ValueError, match="'a' is already tracked"):
        tracker.add("a", 2)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("b", 1)
    with (
        pytest.raises(ValueError, match=r"'c' is not tracked \(tracked: \['a'\]\)"),
        tracker.fork("c"),
    ):
        pass
    with pytest.raises(
        ValueError, match=r"RNG stream 'x' has no 'cpu' state \(parts: \['cuda'\]\)"
    ):
        tracker.set_states({"x": {"cuda": torch.zeros(16, dtype=torch.uint8)}})
    # A CUDA part (e.g. from a GPU run) is dropped by a CPU-only tracker; the CPU part restores.
    tracker.set_states({"a": {**saved["a"], "cuda": torch.zeros(16, dtype=torch.uint8)}})
    assert set(tracker.get_states()["a"]) == {"cpu"}
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), drawn)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"\(cuda=True\) but CUDA is not available"):
            RNGStatesTracker(cuda=True)


def test_model_parallel_seed_streams() -> None:
    masks = {}
    for tp_rank in (0, 1):
        tracker = model_parallel_seed(123, tp_rank, RNGStatesTracker(cuda=False))
        default = torch.rand(16)
        with tracker.fork():
            parallel = torch.rand(16)
        masks[tp_rank] = (default, parallel)
    assert torch.equal(masks[0][0], masks[1][0])  # default: same on every TP rank
    assert not torch.equal(masks[0][1], masks[1][1])  # model-parallel: differs
    assert not torch.equal(masks[0][0], masks[0][1])
    assert model_parallel_seed(5, 0) is get_rng_tracker()
    assert get_rng_tracker().names() == [MODEL_PARALLEL_RNG]


class _Block(nn.Module):
    """Dropout on the default stream and inside the tracker's fork, like a GLM layer."""

    def __init__(self, tracker: RNGStatesTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.dropout(torch.tanh(self.first(x)), p=0.5, training=True)
        with self.tracker.fork():
            h = F.dropout(h, p=0.5, training=True)
        out = self.second(h) * scale
        return out, h.sum(dim=-1)


def _grads(use_checkpoint: bool, input_requires_grad: bool) -> list[torch.Tensor]:
    tracker = RNGStatesTracker(cuda=False)
    torch.manual_seed(0)
    block = _Block(tracker)
    x = torch.randn(4, 8, requires_grad=input_requires_grad)
    model_parallel_seed(11, 0, tracker)
    if use_checkpoint:
        out, extra = checkpoint(block, x, 2.0, tracker=tracker)
    else:
        out, extra = block(x, 2.0)
    # Draw after the forward: the recompute must not shift what comes next either.
    after = torch.rand(3)
    (out.square().sum() + extra.sum()).backward()
    # ... nor what comes after the backward (the recompute's draws are undone).
    after_backward = torch.rand(3)
    with tracker.fork():
        after_backward_forked = torch.rand(3)
    grads = [p.grad for p in block.parameters()]
    extras = [after, after_backward, after_backward_forked]
    return [*grads, *extras, *([x.grad] if input_requires_grad else [])]


@pytest.mark.parametrize("input_requires_grad", [True, False])
def test_checkpoint_gradients_equal_plain_with_dropout(input_requires_grad: bool) -> None:
    plain = _grads(False, input_requires_grad)
    checkpointed = _grads(True, input_requires_grad)
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_without_rng_restore_would_differ() -> None:
    """The test above can fail: recomputing under fresh RNG gives different gradients."""
    tracker = RNGStatesTracker(cuda=False)
    torch.manual_seed(0)
    block = _Block(tracker)
    x = torch.randn(4, 8)
    model_parallel_seed(11, 0, tracker)
    out, _ = block(x, 2.0)
    out_again, _ = block(x, 2.0)  # a recompute that does not rewind the streams
    assert not torch.equal(out, out_again)


def test_checkpoint_in_no_grad_just_runs() -> None:
    with torch.no_grad():
        assert torch.equal(checkpoint(torch.add, torch.ones(2), 1.0), torch.full((2,), 2.0))


def test_all_rng_states_round_trip_through_weights_only_load() -> None:
    tracker = model_parallel_seed(3, 1, RNGStatesTracker(cuda=False))
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()

    def draw() -> list[float]:
        with tracker.fork():
            forked = torch.rand(2).tolist()
        return [
            random.random(),
            random.gauss(0, 1),
            float(np.random.rand()),
            float(np.random.standard_normal()),
            *torch.rand(2).tolist(),
            *forked,
        ]

    states = get_all_rng_states(tracker)
    buffer = io.BytesIO()
    torch.save(states, buffer)
    expected = draw()
    assert draw() != expected  # the streams moved on
    buffer.seek(0)
    set_all_rng_states(torch.load(buffer, weights_only=True), tracker)
    assert draw() == expected
