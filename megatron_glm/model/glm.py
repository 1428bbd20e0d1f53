"""The GLM language model (docs/model.md): embeddings, pre-LN layers, final LayerNorm, tied head.

Shape legend: b batch, s sequence, h hidden, v padded vocab, w TP world size.

``GLMModel(config, tp_group)(input_ids [b,s], position_ids [b,2,s], sep [b]) -> logits [b,s,v/w]``.
The logits stay vocab-parallel (shard r holds vocab ids ``[r*v/w, (r+1)*v/w)``) and go straight
into ``glm_loss``. At TP=1 the model is plain PyTorch and ``state_dict()`` keys are exactly the
canonical names of docs/model.md#canonical-parameter-names.

``config.sequence_parallel`` under TP (docs/parallelism.md#sequence-parallelism): between the
embedding and the LM head the residual stream is each rank's ``[b, s/w, h]`` slice of the
sequence; the LayerNorms, dropouts and residual adds run on slices, the layers' linears gather and
reduce-scatter around their TP regions, and the gradients of the replicated parameters applied to
slices (LayerNorms, row-parallel biases) are summed over the TP ranks by hooks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.kernels import prepare_attention_mask
from megatron_glm.model.embedding import PositionTables, embed, parallel_lm_logits
from megatron_glm.model.init import initialize_parameters
from megatron_glm.model.layer import GLMLayer, make_replicated_layer_norm
from megatron_glm.parallel import (
    VocabParallelEmbedding,
    get_tensor_model_parallel_rank_and_size,
    sum_sequence_parallel_gradients,
)
from megatron_glm.parallel.random import checkpoint

if TYPE_CHECKING:
    from megatron_glm.conversion import CanonicalCheckpoint
    from megatron_glm.inference.kv_cache import KVCache

logger = logging.getLogger(__name__)

__all__ = ["GLMModel", "GLMTransformer", "check_tp_divisibility", "validate_inputs"]


def check_tp_divisibility(config: GLMConfig, tp_size: int) -> None:
    """Raise ``ValueError`` unless ``config`` can be split over ``tp_size`` ranks."""
    checks = {
        "num_attention_heads": config.num_attention_heads,
        "padded_vocab_size": config.padded_vocab_size,
        "ffn_hidden_size": config.ffn_hidden_size,
    }
    bad = {name: value for name, value in checks.items() if value % tp_size}
    if bad:
        raise ValueError(
            f"tensor-parallel size {tp_size} must divide {bad} (pick a TP degree "
            "that divides them, or change make_vocab_size_divisible_by)"
        )


def _check_integer(name: str, t: object, shape: tuple[int | None, ...]) -> torch.Tensor:
    expected = "[" + ", ".join("?" if n is None else str(n) for n in shape) + "]"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor {expected}, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    return t


def validate_inputs(
    config: GLMConfig,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    sep: torch.Tensor,
    num_cached: int = 0,
) -> None:
    """Check shapes, dtypes and value ranges of a model input; ``ValueError`` naming the values.
    ``num_cached``: tokens already in a KV cache in front of these (generation)."""
    _check_integer("input_ids", input_ids, (None, None))
    b, s = input_ids.shape
    _check_integer("position_ids", position_ids, (b, 2, s))
    _check_integer("sep", sep, (b,))
    if b == 0 or s == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")
    # One host sync for all range checks.
    extremes = [t.min().long() for t in (input_ids, position_ids, sep)]
    extremes += [t.max().long().to(extremes[0].device) for t in (input_ids, position_ids, sep)]
    low_id, low_pos, low_sep, high_id, high_pos, high_sep = torch.stack(
        [e.to(extremes[0].device) for e in extremes]
    ).tolist()
    vocab = config.padded_vocab_size
    if low_id < 0 or high_id >= vocab:
        raise ValueError(
            f"token ids must lie in [0, {vocab}) (padded vocab), got min {low_id} max {high_id}"
        )
    rows = config.max_sequence_length + 1
    if low_pos < 0 or high_pos >= rows:
        raise ValueError(
            f"position ids must lie in [0, {rows}) (max_sequence_length + 1 table "
            f"rows), got min {low_pos} max {high_pos}"
        )
    keys = num_cached + s
    if low_sep < 0 or high_sep > keys:
        raise ValueError(
            f"sep must lie in [0, {keys}] (the sequence length, cached tokens included), "
            f"got {sep.tolist()}"
        )


class GLMTransformer(PositionTables):
    """``transformer.*``: the position tables, the layers and the final LayerNorm."""

    def __init__(self, config: GLMConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            GLMLayer(config, i, tp_group, init=False) for i in range(config.num_layers)
        )
        self.final_layernorm = make_replicated_layer_norm(config)
        if config.sequence_parallel:
            # the position tables act before the sequence is split: full gradients already
            sum_sequence_parallel_gradients(self.layers, tp_group)
            sum_sequence_parallel_gradients(self.final_layernorm, tp_group)


class GLMModel(nn.Module):
    """GLM with tensor parallelism over ``tp_group`` (``None``: TP=1, plain PyTorch)."""

    def __init__(self, config: GLMConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        _, tp_size = get_tensor_model_parallel_rank_and_size(tp_group)
        check_tp_divisibility(config, tp_size)
        self.config = config
        self.tp_group = tp_group
        self.sequence_parallel = config.sequence_parallel and tp_size > 1
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size, tp_group
        )
        self.transformer = GLMTransformer(config, tp_group)
        initialize_parameters(self, config, "", tp_group)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None) -> GLMModel:
        """A plain (TP = 1) model holding the weights of checkpoint directory ``path``: a
        consolidated one (``config.json`` + ``model.safetensors``, docs/checkpoints.md#forms), or
        any other form ``megatron_glm.conversion`` reads that carries its config. The state is
        loaded strictly (every canonical name, nothing else); ``dtype`` casts it; eval mode."""
        from megatron_glm.conversion import consolidated, read_checkpoint

        if consolidated.FORM.detect(Path(path)):
            loaded = consolidated.FORM.read(Path(path))
        else:
            loaded = read_checkpoint(path)
        model = cls.from_checkpoint(loaded, dtype=dtype)
        logger.info("loaded %s (%s)", path, loaded.source or "checkpoint")
        return model

    @classmethod
    def from_checkpoint(
        cls, loaded: CanonicalCheckpoint, *, dtype: torch.dtype | None = None
    ) -> GLMModel:
        """A plain (TP = 1) model holding the weights of a checkpoint already read
        (``megatron_glm.conversion.read_checkpoint``); as ``from_pretrained``."""
        # Built on the meta device and given the loaded tensors: no random initialisation to
        # compute and throw away, no second copy of the weights.
        with torch.device("meta"):
            model = cls(loaded.config)
        # assign=True makes new Parameters: keep the partition attributes the layers set
        attributes = {name: dict(vars(param)) for name, param in model.named_parameters()}
        state = {
            name: tensor if dtype is None else tensor.to(dtype)
            for name, tensor in loaded.state.items()
        }
        model.load_state_dict(state, strict=True, assign=True)
        for name, param in model.named_parameters():
            for key, value in attributes[name].items():
                setattr(param, key, value)
        return model.eval()

    def _run_layers(
        self,
        hidden: torch.Tensor,
        sep: torch.Tensor,
        s: int,
        kv_cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden [b, s, h]`` (``[b, s/w, h]`` under sequence parallelism) through the layers;
        ``s`` is the full sequence length, which attention sees."""
        layers = self.transformer.layers
        dropout_active = self.training and self.config.attention_dropout > 0.0
        backend = self.config.attention_backend
        if kv_cache is not None and backend in ("auto", "flex"):
            # Decoding runs one query per row against a key length that grows every step: flex
            # would build a block mask and compile for each new length, SDPA needs neither.
            backend = "sdpa"
        past = 0 if kv_cache is None else kv_cache.length
        # Built once per forward and shared by every layer (the flex BlockMask is not free).
        mask = prepare_attention_mask(sep, s, past + s, backend, dropout_active, key_mask)
        if kv_cache is not None:
            for index, layer in enumerate(layers):
                hidden = layer(hidden, sep, mask, kv_cache.layer(index))
            kv_cache.advance(s)
            return hidden
        if not (self.config.checkpoint_activations and self.training and torch.is_grad_enabled()):
            for layer in layers:
                hidden = layer(hidden, sep, mask)
            return hidden
        chunk = self.config.checkpoint_num_layers
        for start in range(0, len(layers), chunk):

            def run_chunk(x: torch.Tensor, sep_: torch.Tensor, start: int = start) -> torch.Tensor:
                for layer in layers[start : start + chunk]:
                    x = layer(x, sep_, mask)
                return x

            hidden = checkpoint(run_chunk, hidden, sep)
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        sep: torch.Tensor,
        kv_cache: KVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids [b, s]``, ``position_ids [b, 2, s]``, ``sep [b]`` -> ``[b, s, v/w]``.

        Generation (docs/generation.md): with ``kv_cache`` the tokens continue the cached ones
        (``sep`` counts from the first cached token) and are appended to the cache;
        ``key_mask [b, cached + s]`` (bool) hides padding keys from every query."""
        past = 0 if kv_cache is None else kv_cache.length
        validate_inputs(self.config, input_ids, position_ids, sep, past)
        sp = self.sequence_parallel
        if sp and kv_cache is not None:
            raise ValueError("generation with a KV cache runs without sequence parallelism")
        hidden = embed(  # [b, s, h], or [b, s/w, h] under sequence parallelism
            self.word_embeddings, self.transformer, input_ids, position_ids, sp
        )
        hidden = self._run_layers(hidden, sep, input_ids.shape[1], kv_cache, key_mask)
        hidden = self.transformer.final_layernorm(hidden)
        return parallel_lm_logits(hidden, self.word_embeddings.weight, self.tp_group, sp)
