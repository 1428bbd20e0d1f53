"""Initialisation and weight-decay parameter groups (docs/model.md#initialisation,
docs/model.md#weight-decay).

Every parameter is a pure function of ``(seed, canonical name)``: its FULL, unpartitioned tensor is
drawn from a generator seeded with ``stable_hash(seed, name)`` and then cut with ``shard_tensor``
using the parameter's own partition attributes. So the initial model does not depend on the TP
degree, on the pipeline stage that holds a layer, or on the order modules are built in.

Rules: N(0, std) for every weight; the residual-output projections ``attention.dense.weight`` and
``mlp.dense_4h_to_h.weight`` use N(0, std / sqrt(2 * num_layers)) (GPT-2's scaled init); biases 0;
LayerNorm weight 1.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.parallel import get_tensor_model_parallel_rank_and_size, shard_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "full_initial_value",
    "init_std",
    "initialize_parameters",
    "param_groups_for_weight_decay",
    "stable_hash",
]

_SCALED_SUFFIXES = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")


def stable_hash(seed: int, name: str) -> int:
    """A 63-bit integer from ``(seed, name)``, identical across processes and Python versions
    (unlike ``hash()``, which is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_layernorm(name: str) -> bool:
    module_name = name.rsplit(".", 1)[0]
    return module_name.endswith("layernorm")


def init_std(name: str, config: GLMConfig) -> float | None:
    """Standard deviation of the normal init of canonical parameter ``name``; None for the
    constant-initialised ones (biases and LayerNorm parameters)."""
    if name.endswith("bias") or _is_layernorm(name):
        return None
    if name.endswith(_SCALED_SUFFIXES):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def full_initial_value(
    name: str, shape: torch.Size | tuple[int, ...], config: GLMConfig
) -> torch.Tensor:
    """The full fp32 CPU tensor that canonical parameter ``name`` starts from."""
    std = init_std(name, config)
    if std is None:
        fill = 1.0 if _is_layernorm(name) and name.endswith("weight") else 0.0
        return torch.full(tuple(shape), fill, dtype=torch.float32)
    generator = torch.Generator().manual_seed(stable_hash(config.seed, name))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, std, generator=generator)


def initialize_parameters(
    module: nn.Module,
    config: GLMConfig,
    prefix: str = "",
    tp_group: dist.ProcessGroup | None = None,
) -> None:
    """Initialise every parameter of ``module``, whose canonical names are ``prefix + name``.

    Parameters on the meta device are skipped (they have no storage: used to count parameters of
    big presets).
    """
    rank, world_size = get_tensor_model_parallel_rank_and_size(tp_group)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.is_meta:
                continue
            canonical = prefix + name
            partitioned = getattr(param, "tensor_model_parallel", False) and world_size > 1
            shape = list(param.shape)
            if partitioned:
                shape[param.partition_dim] *= world_size
            full = full_initial_value(canonical, shape, config)
            if partitioned:
                full = shard_tensor(
                    full, param.partition_dim, param.partition_stride, rank, world_size
                )
            param.copy_(full)


def param_groups_for_weight_decay(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: decay on weights, none on biases and LayerNorm parameters
    (docs/model.md#weight-decay).

    Parameters with ``requires_grad=False`` are left out; empty groups are dropped.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    norm_types: tuple[type, ...] = (nn.LayerNorm,)
    from megatron_glm.kernels.layernorm import apex_layer_norm_class

    apex_cls = apex_layer_norm_class()
    if apex_cls is not None:
        norm_types = (*norm_types, apex_cls)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, norm_types) or name == "bias":
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
