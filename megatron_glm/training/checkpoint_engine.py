"""The checkpoint engine DeepSpeed loads our checkpoints through: weights only, never pickled code.

DeepSpeed reads every file of its checkpoints (module states, pipeline layers, optimizer and ZeRO
partitions) through ``engine.checkpoint_engine.load``; its ``TorchCheckpointEngine`` does that
with ``torch.load(weights_only=False)``, which runs whatever a pickle asks for.
``WeightsOnlyCheckpointEngine`` loads with ``weights_only=True`` instead, allowing only the plain
data classes DeepSpeed 0.19.8 itself writes into those files (``DEEPSPEED_GLOBALS``: loss-scaler
state, the ZeRO stage enum, the bf16/ZeRO fragment addresses). ``checkpointing.load_checkpoint``
installs it for the duration of a load (``weights_only_loading``). A refused or damaged file is a
``CheckpointError`` naming it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from megatron_glm.conversion.files import weights_only_load


@functools.cache
def deepspeed_globals() -> tuple[Any, ...]:
    """Classes DeepSpeed pickles into its checkpoint files besides tensors and containers: each
    is rebuilt from its fields (``__dict__`` or the enum value); none runs code of the file's
    choosing. Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on fp32 and bf16
    checkpoints of ZeRO stages 0-3 and of pipeline parallelism (``LossScaler``, ``ZeroStageEnum``,
    ``fragment_address``); ``DynamicLossScaler`` is what the ZeRO optimizers store with fp16."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return weights_only_load(path, allowed=deepspeed_globals(), map_location=map_location)


@contextlib.contextmanager
def weights_only_loading(engine: Any) -> Iterator[None]:
    """Within the block, ``engine`` (a DeepSpeed engine) reads checkpoint files weights-only; its
    own checkpoint engine (which may be a configured writer) is back afterwards."""
    saved = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(getattr(engine, "_config", None))
    try:
        yield
    finally:
        engine.checkpoint_engine = saved
