"""RNG streams for tensor parallelism, activation checkpointing, and whole-process RNG snapshots.

Two torch streams per process (Megatron's scheme):

- the *default* stream (torch's default generator): the same seed on every TP rank, so dropout on
  replicated activations (embeddings, residual branches) draws the same mask on every TP rank and
  the ranks stay replicas of each other;
- the *model-parallel* stream, kept by an ``RNGStatesTracker`` under ``MODEL_PARALLEL_RNG``: a seed
  that differs per TP rank, entered with ``with tracker.fork():`` around dropout on *partitioned*
  activations (attention probabilities: each rank holds different heads, which must get
  independent masks, as the unpartitioned model's heads do).

The tracker swaps generator *states* in and out of the default generators: the CPU one always
and, when CUDA is available, the current device's CUDA one. So ``fork()`` covers dropout on CPU
tensors and on CUDA tensors alike, and a snapshot taken on a GPU machine still restores its CPU
part elsewhere.

RNG state is per process, so like Megatron there is one process-wide default tracker, reached with
``get_rng_tracker()`` (not a rank lookup: the tracker holds this process's states, nothing about
groups). Code that wants no globals passes its own ``RNGStatesTracker`` to ``checkpoint`` and
``model_parallel_seed``.
"""

from __future__ import annotations

import contextlib
import logging
import random as py_random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_PARALLEL_RNG",
    "RNGStatesTracker",
    "checkpoint",
    "get_all_rng_states",
    "get_rng_tracker",
    "model_parallel_seed",
    "set_all_rng_states",
]

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Offset between the default and the model-parallel seed (Megatron's choice), so the TP-rank-0
# model-parallel stream is not the default stream.
_MODEL_PARALLEL_SEED_OFFSET = 2718


class RNGStatesTracker:
    """Named RNG streams, each a (CPU, CUDA) generator-state pair swapped in by ``fork()``.

    ``cuda`` says whether to track the current CUDA device's generator as well as the CPU one;
    ``None`` means "if CUDA is available".
    """

    def __init__(self, cuda: bool | None = None) -> None:
        if cuda and not torch.cuda.is_available():
            raise ValueError("RNGStatesTracker(cuda=True) but CUDA is not available")
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: set[int] = set()

    def _current(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def _install(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.cuda and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])

    def reset(self) -> None:
        self._states = {}
        self._seeds = set()

    def names(self) -> list[str]:
        return sorted(self._states)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every stream: ``{name: {"cpu": uint8 tensor, "cuda": uint8 tensor}}``."""
        return {
            name: {part: t.clone() for part, t in state.items()}
            for name, state in self._states.items()
        }

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replace all streams (e.g. with ``get_states`` of an earlier run).

        A part this tracker does not use (a CUDA state on a CPU-only tracker) is dropped, and a
        missing CUDA part keeps the stream's current CUDA state (or the live one): both with a
        warning, since draws on that device will not continue the saved run.
        """
        new: dict[str, dict[str, torch.Tensor]] = {}
        for name, state in states.items():
            if "cpu" not in state:
                raise ValueError(f"RNG stream {name!r} has no 'cpu' state (parts: {sorted(state)})")
            parts = {"cpu": state["cpu"].clone()}
            if self.cuda:
                if "cuda" in state:
                    parts["cuda"] = state["cuda"].clone()
                else:
                    logger.warning("RNG stream %r has no CUDA state: CUDA part not restored", name)
                    parts["cuda"] = self._states.get(name, self._current())["cuda"].clone()
            elif "cuda" in state:
                logger.warning("RNG stream %r: CUDA state ignored (tracker without CUDA)", name)
            new[name] = parts
        self._states = new

    def add(self, name: str, seed: int) -> None:
        """Track a new stream ``name`` starting from ``seed`` (both must be new)."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} is already tracked")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another tracked RNG stream")
        saved = self._current()
        try:
            torch.default_generator.manual_seed(seed)
            if self.cuda:
                torch.cuda.manual_seed(seed)  # the current device only
            self._states[name] = self._current()
        finally:
            self._install(saved)
        self._seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default streams are left untouched."""
        if name not in self._states:
            raise ValueError(f"RNG stream {name!r} is not tracked (tracked: {self.names()})")
        saved = self._current()
        self._install(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._current()
            self._install(saved)


_DEFAULT_TRACKER: RNGStatesTracker | None = None


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide default tracker (created on first use; tracks CUDA if available)."""
    global _DEFAULT_TRACKER
    if _DEFAULT_TRACKER is None:
        _DEFAULT_TRACKER = RNGStatesTracker()
    return _DEFAULT_TRACKER


def model_parallel_seed(
    seed: int, tp_rank: int, tracker: RNGStatesTracker | None = None
) -> RNGStatesTracker:
    """Seed the default stream with ``seed`` (same on all TP ranks) and the tracker's
    ``MODEL_PARALLEL_RNG`` stream with ``seed + 2718 + tp_rank`` (different per TP rank).

    Only torch's generators are seeded (CPU and every CUDA device). Callers choose ``seed`` per
    pipeline stage if they want different dropout per stage (Megatron adds ``100 * pp_rank``).
    Returns the tracker (the default one unless given).
    """
    if tp_rank < 0:
        raise ValueError(f"tp_rank must be >= 0, got {tp_rank}")
    tracker = get_rng_tracker() if tracker is None else tracker
    torch.manual_seed(seed)  # also seeds every CUDA device
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)
    return tracker


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def _capture_torch_states(tracker: RNGStatesTracker) -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state(), "tracker": tracker.get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_torch_states(states: dict[str, Any], tracker: RNGStatesTracker) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    tracker.set_states(states["tracker"])


class _CheckpointFunction(torch.autograd.Function):
    """Forward without keeping activations; backward recomputes them under the forward's RNG."""

    @staticmethod
    def forward(
        ctx: Any,
        run_function: Callable[..., Any],
        tracker: RNGStatesTracker,
        dummy: torch.Tensor,
        *args: Any,
    ) -> Any:
        del dummy  # only there so the outputs require grad when no input does (params may)
        ctx.run_function = run_function
        ctx.tracker = tracker
        ctx.rng_states = _capture_torch_states(tracker)
        tensor_positions = [i for i, arg in enumerate(args) if torch.is_tensor(arg)]
        ctx.tensor_positions = tensor_positions
        ctx.other_args = [None if torch.is_tensor(arg) else arg for arg in args]
        ctx.save_for_backward(*(args[i] for i in tensor_positions))
        with torch.no_grad():
            outputs = run_function(*args)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "megatron_glm checkpoint() supports .backward() only, not torch.autograd.grad()"
            )
        args = list(ctx.other_args)
        for position, saved in zip(ctx.tensor_positions, ctx.saved_tensors):
            detached = saved.detach()
            detached.requires_grad_(saved.requires_grad)
            args[position] = detached

        # Recompute under the forward's RNG states so dropout draws the same masks, then put the
        # current states back so the rest of the backward pass is unaffected.
        current = _capture_torch_states(ctx.tracker)
        _restore_torch_states(ctx.rng_states, ctx.tracker)
        try:
            with torch.enable_grad():
                outputs = ctx.run_function(*args)
        finally:
            _restore_torch_states(current, ctx.tracker)

        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grad_outputs)
            if torch.is_tensor(out) and out.requires_grad and grad is not None
        ]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        input_grads = tuple(
            arg.grad if torch.is_tensor(arg) and arg.requires_grad else None for arg in args
        )
        return (None, None, None, *input_grads)


def checkpoint(
    function: Callable[..., Any], *args: Any, tracker: RNGStatesTracker | None = None
) -> Any:
    """``function(*args)`` with activation checkpointing (activations recomputed in backward).

    The CPU, CUDA (if initialised) and tracker RNG states of the forward are restored for the
    recompute, so dropout masks, including those drawn inside ``tracker.fork()``, are identical and
    the gradients equal those without checkpointing. ``function`` returns a tensor or a tuple of
    tensors; non-tensor ``args`` are passed through. Autocast state is not recorded: call it inside
    the same autocast context as the forward (the backward of ``torch.autograd.backward`` does).
    """
    if not torch.is_grad_enabled():
        return function(*args)  # nothing to recompute (evaluation)
    tracker = get_rng_tracker() if tracker is None else tracker
    dummy = torch.empty(0, requires_grad=True)
    return _CheckpointFunction.apply(function, tracker, dummy, *args)


# ---------------------------------------------------------------------------------------------
# Whole-process RNG snapshots (for exact resume)


def get_all_rng_states(tracker: RNGStatesTracker | None = None) -> dict[str, Any]:
    """Every RNG stream of this process as tensors, lists and numbers only.

    Python ``random``, numpy's global generator, torch CPU, torch CUDA (current device, when
    available) and the tracker's streams. The dict loads with ``torch.load(weights_only=True)``
    (no pickled objects) and ``set_all_rng_states`` restores it exactly.
    """
    tracker = get_rng_tracker() if tracker is None else tracker
    py_version, py_internal, py_gauss = py_random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "tracker": tracker.get_states(),
    }
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def set_all_rng_states(states: dict[str, Any], tracker: RNGStatesTracker | None = None) -> None:
    """Restore what ``get_all_rng_states`` returned (also after a torch.save/torch.load trip)."""
    tracker = get_rng_tracker() if tracker is None else tracker
    python = states["python"]
    internal = tuple(int(v) for v in python["internal"].tolist())
    py_random.setstate((int(python["version"]), internal, python["gauss_next"]))
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            int(numpy["pos"]),
            int(numpy["has_gauss"]),
            float(numpy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(states["torch_cpu"])
    if "torch_cuda" in states:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(states["torch_cuda"])
        else:
            logger.warning("RNG snapshot has a CUDA state but CUDA is not available: not restored")
    tracker.set_states(states["tracker"])
