"""Fault injection for the checkpoint tests, loaded by the trainer through
``MEGATRON_GLM_HOOKS=tests.training.fault_hooks:install``.

``FAULT_SAVE_ITERATION=k`` fails the save of iteration ``k`` after this rank's files are written
and before the checkpoint is published; ``FAULT_MODE`` is ``raise`` (an exception) or ``kill``
(SIGKILL of the process, like a node dying).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any


def install(hooks: Any) -> None:
    at = int(os.environ["FAULT_SAVE_ITERATION"])
    mode = os.environ.get("FAULT_MODE", "raise")

    def on_save(iteration: int, tag_dir: Path) -> None:
        if iteration != at:
            return
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure while saving iteration {iteration} to {tag_dir}")

    hooks.on_save.append(on_save)
