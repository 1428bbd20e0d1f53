"""Fault injection: named points at which a test makes a process die, stall or go wrong.

Inert unless ``MEGATRON_GLM_FAULT`` is set. Its value is one or more entries separated by ``;``::

    POINT:ACTION[@rank=R][,iteration=K]

``ACTION`` is ``kill`` (SIGKILL to this process), ``term`` (SIGTERM to this process), ``raise``
(``InjectedFault``), ``sleep=SECONDS``, or a value the caller acts on itself (``nan``, ``inf``):
``fault_point`` returns it. An entry without ``rank``/``iteration`` fires on every rank/iteration.
The points are listed in ``POINTS`` and in docs/failure-semantics.md; an unknown point is an error,
so a misspelt fault never makes a test pass by not firing.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

FAULT_ENV = "MEGATRON_GLM_FAULT"

POINTS = (
    "save.before_data",  # a save has started; no file of it written yet
    "save.during_data",  # some of this rank's checkpoint files are written, not all
    "save.after_data",  # all of this rank's files are written; the checkpoint is not published
    "save.before_publish",  # every rank's files are written; the pointer/manifest is not
    "save.after_publish",  # the checkpoint is complete and published
    "step.start",  # before the forward pass of an iteration
    "step.loss",  # the loss of an iteration is known (``nan``/``inf`` poison it)
    "step.end",  # after the optimizer step of an iteration
)
RETURNED_ACTIONS = ("nan", "inf")


class InjectedFault(RuntimeError):
    """Raised at a fault point whose action is ``raise``."""


@dataclass(frozen=True)
class Fault:
    point: str
    action: str
    rank: int | None = None
    iteration: int | None = None

    def matches(self, point: str, rank: int | None, iteration: int | None) -> bool:
        return (
            self.point == point
            and (self.rank is None or self.rank == rank)
            and (self.iteration is None or self.iteration == iteration)
        )


def parse_faults(spec: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        head, _, where = entry.partition("@")
        point, _, action = head.partition(":")
        if point not in POINTS:
            raise ValueError(
                f"{FAULT_ENV}: unknown fault point {point!r}; known: {', '.join(POINTS)}"
            )
        if not (
            action in ("kill", "term", "raise") + RETURNED_ACTIONS or action.startswith("sleep=")
        ):
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {entry!r}")
        selectors: dict[str, int] = {}
        for item in filter(None, where.split(",")):
            key, _, value = item.partition("=")
            if key not in ("rank", "iteration") or not value.lstrip("-").isdigit():
                raise ValueError(f"{FAULT_ENV}: bad selector {item!r} in {entry!r}")
            selectors[key] = int(value)
        faults.append(Fault(point, action, **selectors))
    return faults


def fault_point(point: str, *, rank: int | None = None, iteration: int | None = None) -> str | None:
    """Carry out the faults registered for ``point`` on this rank and iteration.

    Returns ``"nan"`` or ``"inf"`` when such a fault fires (the caller poisons its value), else None.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    if point not in POINTS:
        raise ValueError(f"fault_point: unknown point {point!r}")
    returned = None
    for fault in parse_faults(spec):
        if not fault.matches(point, rank, iteration):
            continue
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif fault.action == "raise":
            raise InjectedFault(f"injected fault at {point} (rank {rank}, iteration {iteration})")
        elif fault.action.startswith("sleep="):
            time.sleep(float(fault.action.removeprefix("sleep=")))
        else:
            returned = fault.action
    return returned
