"""Typed configuration, one module per concern (model, data, training)."""

from megatron_glm.config.model import PRESETS, GLMConfig, pad_vocab_size

__all__ = ["PRESETS", "GLMConfig", "pad_vocab_size"]
