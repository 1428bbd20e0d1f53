"""Stop when training is broken, and let every rank agree on stopping.

Once per iteration, inside the optimizer step and before the update, every rank puts two things
into one small all-reduce (MAX over the world): whether a loss or a local gradient of this
iteration is not finite here (bf16/fp32; fp16 leaves overflow to DeepSpeed's loss scaler), and
whether a stop was requested here (SIGTERM/SIGINT or a dead launcher, training/stop_signals.py).
A non-finite value on any rank vetoes the update on every rank, so the parameters stay as they
were; a stop request makes every rank finish the iteration, save and exit 0.

After the iteration, ``StepGuard.verdict`` turns what happened into ``TrainingBroken`` (exit
status 3, docs/failure-semantics.md) when: the update was vetoed; DeepSpeed's own optimizer
skipped it in bf16/fp32 (its overflow check saw a non-finite gradient); the gradient norm is not
finite; fp16 skipped more than ``--max-skipped-steps`` updates in a row; or, with
``--loss-spike-factor F --loss-spike-action stop``, the loss exceeds F times the mean of the last
``--loss-spike-window`` losses. Every input of the verdict is the same on every rank (the agreed
flags, DeepSpeed's globally reduced overflow decision, the data-parallel mean loss), so all ranks
stop at the same iteration without another collective.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from megatron_glm.training.faults import fault_point
from megatron_glm.training.launch import ProgressBoard

logger = logging.getLogger(__name__)

LOSS_SPIKE_ACTIONS = ("warn", "stop")


class ExitCode(IntEnum):
    """``pretrain_glm.py``'s exit statuses (docs/failure-semantics.md)."""

    OK = 0  # finished, or stopped on request (signal, launcher gone) after saving
    ERROR = 1  # anything unexpected: a Python traceback
    BAD_INPUT = 2  # command line, data, checkpoint to load, --save not writable
    BROKEN = 3  # non-finite loss or gradient norm, too many fp16 skips, a loss spike (stop)
    SAVE_LOCKED = 4  # another live job holds --save
    PEER_TIMEOUT = 5  # a collective waited longer than --distributed-timeout-minutes


@dataclass(frozen=True)
class FailureConfig:
    """When to stop a broken run, and how long to wait for a peer (docs/failure-semantics.md)."""

    # fp16: consecutive overflow skips before the run is declared broken. DeepSpeed halves the
    # scale on each (after ``hysteresis`` overflows): from the usual 2**16 to 1 is 16 to 32 skips.
    max_skipped_steps: int = 50
    loss_spike_factor: float | None = None  # None: no spike guard
    loss_spike_window: int = 100  # losses the spike is measured against
    loss_spike_action: str = "warn"
    distributed_timeout_minutes: float = 30.0  # torch.distributed's own default for gloo

    def problems(self) -> list[str]:
        out = []
        if self.max_skipped_steps < 1:
            out.append(f"--max-skipped-steps must be >= 1, got {self.max_skipped_steps}")
        if self.loss_spike_factor is not None and not (
            math.isfinite(self.loss_spike_factor) and self.loss_spike_factor > 1.0
        ):
            out.append(f"--loss-spike-factor must be > 1, got {self.loss_spike_factor}")
        if self.loss_spike_window < 1:
            out.append(f"--loss-spike-window must be >= 1, got {self.loss_spike_window}")
        if self.loss_spike_action not in LOSS_SPIKE_ACTIONS:
            out.append(
                f"--loss-spike-action must be one of {LOSS_SPIKE_ACTIONS}, "
                f"got {self.loss_spike_action!r}"
            )
        if not (
            math.isfinite(self.distributed_timeout_minutes) and self.distributed_timeout_minutes > 0
        ):
            out.append(
                "--distributed-timeout-minutes must be positive, got "
                f"{self.distributed_timeout_minutes}"
            )
        return out


class TrainingBroken(RuntimeError):
    """Training cannot go on (exit status 3); nothing was saved for ``iteration``."""

    def __init__(self, reason: str, iteration: int) -> None:
        self.iteration = iteration
        super().__init__(
            f"training stopped at iteration {iteration}: {reason}. Nothing was saved for it; "
            "the last complete checkpoint is kept (docs/failure-semantics.md)"
        )


class StepGuard:
    """The per-iteration checks of one rank. The loop calls ``begin`` and ``verdict``; the
    trainer calls ``observe_loss`` on each micro-batch loss and ``allow_update`` from inside the
    optimizer step."""

    def __init__(
        self,
        config: FailureConfig,
        precision: str,
        stop_requested: Callable[[], bool],
        progress: ProgressBoard | None = None,
    ) -> None:
        """``stop_requested``: whether this rank was asked to stop; ``progress``: where the
        iterations each rank reached are noted (names the rank behind after a timeout)."""
        self.config = config
        self.precision = precision
        self._stop_requested = stop_requested
        self._progress = progress
        # NCCL reduces CUDA tensors only
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.iteration = 0
        self.stop_agreed = False  # some rank asked to stop: finish this iteration, save, exit
        # ranks where a loss / a gradient of this iteration was not finite (gradients are seen
        # after their data-parallel reduction, which spreads one rank's NaN to its peers)
        self.nonfinite_loss_ranks: list[int] = []
        self.nonfinite_grad_ranks: list[int] = []
        self._agreed = False
        self._loss_bad: torch.Tensor | None = None
        self._skipped_in_a_row = 0
        self._recent: deque[float] = deque(maxlen=config.loss_spike_window)

    @property
    def vetoed(self) -> bool:
        return bool(self.nonfinite_loss_ranks or self.nonfinite_grad_ranks)

    def begin(self, iteration: int) -> None:
        self.iteration = iteration
        self._agreed = False
        self.nonfinite_loss_ranks, self.nonfinite_grad_ranks = [], []
        self._loss_bad = None
        fault_point("step.start", rank=self.rank, iteration=iteration)
        if self._progress is not None:
            self._progress.record(iteration)

    def observe_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note whether a micro-batch loss is finite (no device sync); a ``step.loss`` fault of
        ``nan``/``inf`` multiplies it in, so its gradients are poisoned too, as in a real
        divergence."""
        poison = fault_point("step.loss", rank=self.rank, iteration=self.iteration)
        if poison is not None:
            loss = loss * float(poison)
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        return loss

    def allow_update(self, grads: Iterable[torch.Tensor]) -> bool:
        """The agreement of all ranks (every rank calls it once per iteration); False vetoes the
        update. ``grads``: the gradients this rank can see (none under ZeRO, whose optimizer
        checks them itself)."""
        assert not self._agreed, "StepGuard.allow_update called twice in one iteration"
        self._agreed = True
        world = self.world_size
        # [loss not finite on rank 0..N-1, gradient not finite on rank 0..N-1, stop requested]
        flags = torch.zeros(2 * world + 1, dtype=torch.int32, device=self.device)
        if self.precision != "fp16":
            if self._loss_bad is not None:
                flags[self.rank] = self._loss_bad.to(flags.device)
            checks = [~torch.isfinite(g).all() for g in grads if g is not None]
            if checks:
                flags[world + self.rank] = torch.stack(checks).any().to(flags.device)
        flags[-1] = int(self._stop_requested())
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags = flags.cpu()
        self.nonfinite_loss_ranks = [r for r in range(world) if flags[r]]
        self.nonfinite_grad_ranks = [r for r in range(world) if flags[world + r]]
        self.stop_agreed = self.stop_agreed or bool(flags[-1])
        return not self.vetoed

    def verdict(
        self, loss: float, grad_norm: float | None, applied: bool, loss_scale: float | None
    ) -> TrainingBroken | None:
        """What this iteration's outcome means; the same on every rank."""
        assert self._agreed, "the optimizer step did not consult StepGuard.allow_update"
        it = self.iteration
        if self.vetoed:
            found = [
                f"non-finite {what} on rank(s) {', '.join(map(str, ranks))}"
                for what, ranks in (
                    ("loss", self.nonfinite_loss_ranks),
                    ("gradients", self.nonfinite_grad_ranks),
                )
                if ranks
            ]
            return TrainingBroken(
                f"{'; '.join(found)} (loss {loss}); the update was not applied on any rank", it
            )
        if self.precision == "fp16":
            self._skipped_in_a_row = 0 if applied else self._skipped_in_a_row + 1
            if self._skipped_in_a_row > self.config.max_skipped_steps:
                return TrainingBroken(
                    f"{self._skipped_in_a_row} fp16 updates in a row skipped for overflow (loss "
                    f"scale now {loss_scale}; --max-skipped-steps {self.config.max_skipped_steps})",
                    it,
                )
        elif not applied:
            return TrainingBroken(
                f"DeepSpeed's {self.precision} optimizer found non-finite gradients and skipped "
                "the update",
                it,
            )
        elif grad_norm is not None and not math.isfinite(grad_norm):
            return TrainingBroken(f"the gradient norm is {grad_norm}", it)
        if applied:
            return self._check_spike(loss)
        return None

    def _check_spike(self, loss: float) -> TrainingBroken | None:
        factor = self.config.loss_spike_factor
        if factor is None:
            return None
        full = len(self._recent) == self._recent.maxlen
        reference = sum(self._recent) / len(self._recent) if self._recent else math.nan
        self._recent.append(loss)
        if not (full and loss > factor * reference):
            return None
        message = (
            f"loss spike: {loss:.6g} > {factor:g} x {reference:.6g} (the mean of the last "
            f"{self._recent.maxlen} losses; --loss-spike-factor)"
        )
        if self.config.loss_spike_action == "stop":
            return TrainingBroken(message, self.iteration)
        if self.rank == 0:
            logger.warning("iteration %d: %s", self.iteration, message)
        return None


def add_failure_args(p: argparse.ArgumentParser) -> None:
    """The command-line flags of :class:`FailureConfig` (pretrain_glm.py, finetune_glm.py)."""
    g = p.add_argument_group("failures (docs/failure-semantics.md)")
    defaults = FailureConfig()
    g.add_argument(
        "--max-skipped-steps",
        type=int,
        default=defaults.max_skipped_steps,
        help="fp16: stop (exit status 3) after more than this many consecutive updates skipped "
        "for overflow",
    )
    g.add_argument(
        "--loss-spike-factor",
        type=float,
        default=None,
        help="flag a loss above this multiple of the mean of the last --loss-spike-window "
        "losses (default: off)",
    )
    g.add_argument("--loss-spike-window", type=int, default=defaults.loss_spike_window)
    g.add_argument(
        "--loss-spike-action",
        choices=LOSS_SPIKE_ACTIONS,
        default=defaults.loss_spike_action,
        help="warn: log it; stop: exit with status 3 without saving that iteration",
    )
    g.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=defaults.distributed_timeout_minutes,
        help="a collective that waits longer for a peer fails (exit status 5), naming the "
        "ranks that were behind",
    )


def failure_config_from_args(args: argparse.Namespace, problems: list[str]) -> FailureConfig:
    """The flags of :func:`add_failure_args` as a config; what is wrong with them goes to
    ``problems``."""
    failure = FailureConfig(
        max_skipped_steps=args.max_skipped_steps,
        loss_spike_factor=args.loss_spike_factor,
        loss_spike_window=args.loss_spike_window,
        loss_spike_action=args.loss_spike_action,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    problems.extend(failure.problems())
    return failure
