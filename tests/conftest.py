"""Shared pytest set-up for the whole suite."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `from tests.distributed.harness import run_distributed` must work however pytest was started
# (`pytest` does not put the working directory on sys.path, `python -m pytest` does); spawned
# ranks inherit sys.path, so they can import the test modules too.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# The suite runs on few shared cores: one intra-op thread per process keeps multi-process tests
# from oversubscribing them (and makes CPU numerics independent of the core count).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
