"""A model to generate with, from a checkpoint of any form, at any TP degree (docs/generation.md).

TP = 1: the checkpoint is read once (``megatron_glm.conversion.read_checkpoint``: ours at any
TP/PP, consolidated, the official GLM layout, Hugging Face) and becomes a plain ``GLMModel``.
TP > 1 (every rank of the group calls): TP rank 0 reads it for its config and tokenizer, every rank
builds its shard of the model, and ``training.engine.load_pretrained_weights`` hands out the TP
slices as for ``--load-pretrained`` in training (rank 0 reads the checkpoint a second time there;
no other rank ever holds more than one full tensor).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from megatron_glm.config import GLMConfig
from megatron_glm.config.data import TokenizerSpec
from megatron_glm.model import GLMModel
from megatron_glm.parallel import get_tensor_model_parallel_rank_and_size

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model_for_generation"]


@dataclass(frozen=True)
class LoadedModel:
    """The model (eval mode) and what the checkpoint says about itself."""

    model: GLMModel
    tokenizer_spec: TokenizerSpec | None  # the tokenizer the checkpoint records, if any
    iteration: int | None
    source: str


def _header(path: str) -> tuple[dict[str, Any], Any]:
    from megatron_glm.conversion import read_checkpoint

    checkpoint = read_checkpoint(path)
    header = {
        "config": checkpoint.config.to_dict(),
        "tokenizer": checkpoint.tokenizer,
        "iteration": checkpoint.iteration,
        "source": checkpoint.source or path,
    }
    return header, checkpoint


def load_model_for_generation(
    path: str | Path,
    *,
    tp_group: dist.ProcessGroup | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> LoadedModel:
    """Load the checkpoint at ``path`` as a ``GLMModel`` over ``tp_group`` (``None``: TP = 1).
    Under TP the group must be the whole world (generation runs one model replica)."""
    path = str(path)
    _, tp_size = get_tensor_model_parallel_rank_and_size(tp_group)
    if tp_size == 1:
        header, checkpoint = _header(path)
        model = GLMModel.from_checkpoint(checkpoint, dtype=dtype)
        del checkpoint
    else:
        if dist.get_world_size() != tp_size:
            raise ValueError(
                f"generation runs one model over all {dist.get_world_size()} processes: the TP "
                f"group must hold them all, it holds {tp_size}"
            )
        from megatron_glm.training.engine import load_pretrained_weights

        box = [_header(path)[0] if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        header = box[0]
        config = GLMConfig(**header["config"])
        with torch.device("meta"):
            model = GLMModel(config, tp_group)
        model = model.to_empty(device="cpu")
        groups = SimpleNamespace(tp_rank=dist.get_rank(tp_group), tp_size=tp_size)
        load_pretrained_weights(model, path, config, groups)
        if dtype is not None:
            model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    spec = TokenizerSpec(**header["tokenizer"]) if header["tokenizer"] else None
    logger.info("loaded %s for generation (iteration %s)", header["source"], header["iteration"])
    return LoadedModel(model.eval(), spec, header["iteration"], header["source"])
