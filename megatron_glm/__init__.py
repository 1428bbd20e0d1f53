"""megatron_glm: Megatron/DeepSpeed-style distributed training for GLM."""

from megatron_glm.config import GLMConfig
from megatron_glm.model import GLMModel

__all__ = ["GLMConfig", "GLMModel"]
__version__ = "0.1.0"
