"""Fixtures shared by the conversion tests: the trained sources and their canonical weights."""

from __future__ import annotations

import pytest

from megatron_glm.conversion import deepspeed_form
from megatron_glm.conversion.canonical import CanonicalCheckpoint
from tests.conversion import (
    TrainedCheckpoints,
    Zero3Checkpoint,
    trained_checkpoints,
    zero3_checkpoint,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> TrainedCheckpoints:
    return trained_checkpoints(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def trained(sources: TrainedCheckpoints) -> CanonicalCheckpoint:
    """The TP 2 x PP 2 run's weights, read by the deepspeed form."""
    return deepspeed_form.FORM.read(sources.tp2_pp2)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> Zero3Checkpoint:
    """A TP 2 run at ZeRO 3 in bf16 and its final module weights (launched once per session)."""
    return zero3_checkpoint(tmp_path_factory.getbasetemp())
