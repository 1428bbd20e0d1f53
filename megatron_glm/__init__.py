"""megatron_glm: Megatron/DeepSpeed-style distributed training for GLM."""

from typing import TYPE_CHECKING, Any

from megatron_glm.config import GLMConfig

if TYPE_CHECKING:
    from megatron_glm.model import GLMModel

__all__ = ["GLMConfig", "GLMModel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The model pulls in torch; offline tools (preprocess_data, merge_datasets) import only the
    # data package and should not pay torch's start-up time.
    if name == "GLMModel":
        from megatron_glm.model import GLMModel

        return GLMModel
    raise AttributeError(f"module 'megatron_glm' has no attribute {name!r}")
