"""LayerNorm factory: apex's fused kernel on CUDA when apex is installed, torch's otherwise.

apex is optional (it needs a CUDA build); both classes keep the parameters ``weight`` and ``bias``,
so checkpoints and the canonical names (docs/model.md#canonical-parameter-names) do not depend on
which one was used.
"""

from __future__ import annotations

import importlib
import logging

import torch

logger = logging.getLogger(__name__)

__all__ = ["apex_layer_norm_class", "make_layer_norm"]


def apex_layer_norm_class() -> type[torch.nn.Module] | None:
    """apex's ``FusedLayerNorm`` if apex imports and CUDA is available, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        module = importlib.import_module("apex.normalization")
    except Exception:  # ImportError, or a broken apex build failing at import
        return None
    return getattr(module, "FusedLayerNorm", None)


def make_layer_norm(
    hidden_size: int, eps: float = 1e-5, prefer_apex: bool = True
) -> torch.nn.Module:
    """A LayerNorm over the last dim with learnable ``weight`` (ones) and ``bias`` (zeros)."""
    if hidden_size <= 0 or eps <= 0:
        raise ValueError(f"hidden_size ({hidden_size}) and eps ({eps}) must be positive")
    cls = apex_layer_norm_class() if prefer_apex else None
    if cls is not None:
        return cls(hidden_size, eps=eps)
    return torch.nn.LayerNorm(hidden_size, eps=eps)
