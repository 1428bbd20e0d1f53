"""Golden losses of the tiny preset (tests/assets/golden_tiny.json): a refactor that changes the
model's numerics, by even one bit, fails here.

The run (a fixed Part A / Part B batch, a few plain SGD steps in fp32 on one CPU thread) is
``tests/assets/make_golden.py``, which also regenerates the file when a change is meant to move the
numbers. Exactness needs the same torch and the same CPU kernels (float results differ in the last
bits between torch versions, between AVX512 / AVX2 code paths and between CPUs with and without AMX
at equal capability): on the torch version recorded in the file (``torch.__version__`` starts with
it) and the recorded CPU kernels (``make_golden.cpu_kernels``) every loss, gradient norm and the
final parameter fingerprint must match bit for bit; anywhere else they must agree
within a relative 1e-6 (measured on torch 2.13: AVX2 or unvectorised kernels instead of AVX512, or
2-4 threads instead of one, move them by at most 1.6e-7).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from tests.assets.make_golden import (
    CONFIG_OVERRIDES,
    GOLDEN_PATH,
    LR,
    STEPS,
    cpu_kernels,
    golden_batch,
    golden_run,
)

FALLBACK_RTOL = 1e-6


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the last bits depend on the thread count
    try:
        return golden_run(golden_batch())
    finally:
        torch.set_num_threads(threads)


def _exact_here(golden: dict[str, Any]) -> bool:
    return (
        torch.__version__.startswith(golden["torch"]) and golden.get("cpu_kernels") == cpu_kernels()
    )


def test_golden_run_is_the_recorded_one(golden: dict[str, Any]) -> None:
    """The batch (regenerated from its numpy seed) and the settings are those of the file."""
    assert golden_batch() == golden["batch"]
    assert golden["config"] == {"preset": "tiny", **CONFIG_OVERRIDES}
    assert (golden["steps"], golden["lr"]) == (STEPS, LR)


@pytest.mark.parametrize("key", ["losses", "grad_norms", "param_fingerprint"])
def test_golden_numbers(key: str, golden: dict[str, Any], result: dict[str, Any]) -> None:
    got = result[key] if isinstance(result[key], list) else [result[key]]
    stored = golden[f"{key}_hex"]
    want = [float.fromhex(h) for h in (stored if isinstance(stored, list) else [stored])]
    assert len(got) == len(want), (key, got, want)
    if _exact_here(golden):
        assert [v.hex() for v in got] == [v.hex() for v in want], (
            f"{key} moved on the pinned torch {golden['torch']} / {golden['cpu_kernels']}: "
            f"got {got}, golden {want}. If the change is meant to alter the numerics, regenerate "
            "with `python tests/assets/make_golden.py` and say why in the commit."
        )
    else:
        for i, (g, w) in enumerate(zip(got, want)):
            assert math.isclose(g, w, rel_tol=FALLBACK_RTOL), (key, i, g, w)
