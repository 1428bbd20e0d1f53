"""One GLM transformer layer (pre-LN, docs/model.md#architecture) and its attention and MLP blocks.

Shape legend: b batch, s sequence, h hidden, w TP world size, n heads (all), n/w heads on this rank,
d head dim, f FFN width.

TP layout: ``query_key_value`` is column-parallel with stride 3, so rank r holds the rows
[Q_r; K_r; V_r] of its own heads and computes attention for them alone; ``dense`` is row-parallel
(its bias is added once, after the all-reduce). ``dense_h_to_4h`` is column-parallel,
``dense_4h_to_h`` row-parallel. Attention dropout runs inside the model-parallel RNG fork (each TP
rank drops different heads' probabilities); residual dropout uses the default generator, which is
seeded identically on the TP ranks, so the replicated activations stay identical. Under sequence
parallelism (docs/parallelism.md#sequence-parallelism) the residual stream is each rank's
``[b, s/w, h]`` slice and its dropout draws from the model-parallel stream instead.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from megatron_glm.config import GLMConfig
from megatron_glm.kernels import (
    PreparedMask,
    attention,
    bias_dropout_add,
    bias_dropout_add_reference,
    bias_gelu,
    bias_gelu_reference,
    make_layer_norm,
)
from megatron_glm.model.init import initialize_parameters
from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    divide,
    get_tensor_model_parallel_rank_and_size,
    set_tensor_model_parallel_attributes,
)
from megatron_glm.parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker

if TYPE_CHECKING:
    from megatron_glm.inference.kv_cache import LayerKVCache

logger = logging.getLogger(__name__)

__all__ = ["GLMLayer", "ParallelMLP", "ParallelSelfAttention", "make_replicated_layer_norm"]


def make_replicated_layer_norm(config: GLMConfig) -> nn.Module:
    """A LayerNorm of width h whose parameters are marked replicated over TP."""
    norm = make_layer_norm(config.hidden_size, config.layernorm_epsilon)
    for param in norm.parameters():
        set_tensor_model_parallel_attributes(param, False)
    return norm


class ParallelSelfAttention(nn.Module):
    """Fused-QKV self-attention over this rank's heads, with GLM's Part A / Part B mask."""

    def __init__(self, config: GLMConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        _, world_size = get_tensor_model_parallel_rank_and_size(tp_group)
        self.tp_size = world_size
        h = config.hidden_size
        self.num_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.backend = config.attention_backend
        self.recompute_core = config.recompute_attention_core
        if self.backend == "flex" and self.attention_dropout > 0.0:
            raise ValueError(
                f"attention_backend='flex' cannot apply attention dropout (attention_dropout="
                f"{self.attention_dropout}): set attention_dropout=0 or use 'sdpa'/'auto'"
            )
        # stride 3: the full weight is [Q; K; V] (docs/model.md#tensor-parallel-partition); rank r
        # keeps [Q_r; K_r; V_r].
        sp = config.sequence_parallel
        self.query_key_value = ColumnParallelLinear(
            h, 3 * h, tp_group, stride=3, sequence_parallel=sp
        )
        self.dense = RowParallelLinear(
            h, h, tp_group, input_is_parallel=True, skip_bias_add=True, sequence_parallel=sp
        )

    def _dropout_rng(self) -> contextlib.AbstractContextManager[None]:
        tracker = get_rng_tracker()
        if MODEL_PARALLEL_RNG in tracker.names() or self.tp_size > 1:
            return tracker.fork()  # raises a clear error under TP when nobody seeded the stream
        # TP=1 without model_parallel_seed(): every head is on this rank, the default stream does.
        return contextlib.nullcontext()

    def forward(
        self,
        hidden: torch.Tensor,
        sep: torch.Tensor,
        mask: PreparedMask | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden [b, s, h]`` -> (``out [b, s, h]`` before its bias, the dense bias ``[h]``);
        under sequence parallelism ``[b, s/w, h]`` -> ``[b, s/w, h]``. ``kv_cache``: this layer's
        keys and values of earlier tokens (generation); the new ones are appended and the queries
        attend to all of them."""
        mixed = self.query_key_value(hidden)  # [b, s, 3h/w] = [Q_r | K_r | V_r]
        b, s, _ = mixed.shape
        # One copy into [3, b, n/w, s, d]: every attention matmul then reads contiguous heads
        # (strided q/k/v views made torch.matmul copy them again for each of its products).
        qkv = mixed.view(b, s, 3, self.num_heads_per_partition, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # 3 x [b, n/w, s, d]
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # 2 x [b, n/w, cached + s, d]
        dropout_p = self.attention_dropout if self.training else 0.0
        if dropout_p > 0.0:
            with self._dropout_rng():
                context = attention(
                    q,
                    k,
                    v,
                    sep,
                    backend=self.backend,
                    dropout_p=dropout_p,
                    training=True,
                    mask=mask,
                    recompute=self.recompute_core,
                )
        else:
            context = attention(
                q, k, v, sep, backend=self.backend, mask=mask, recompute=self.recompute_core
            )
        context = context.transpose(1, 2).reshape(b, s, -1)  # [b, s, h/w]
        return self.dense(context)  # ([b, s, h], [h])


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> GeLU-tanh -> h (row-parallel)."""

    def __init__(self, config: GLMConfig, tp_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        assert f is not None
        self.fused_bias_gelu = config.fused_bias_gelu
        sp = config.sequence_parallel
        self.dense_h_to_4h = ColumnParallelLinear(
            h, f, tp_group, skip_bias_add=True, sequence_parallel=sp
        )
        self.dense_4h_to_h = RowParallelLinear(
            f, h, tp_group, skip_bias_add=True, sequence_parallel=sp
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden [b, s, h]`` -> (``out [b, s, h]`` before its bias, the bias ``[h]``)."""
        intermediate, bias = self.dense_h_to_4h(hidden)  # [b, s, f/w], [f/w]
        gelu = bias_gelu if self.fused_bias_gelu else bias_gelu_reference
        intermediate = gelu(bias, intermediate)
        return self.dense_4h_to_h(intermediate)  # ([b, s, h], [h])


class GLMLayer(nn.Module):
    """``x + Dropout(Attn(LN1(x)))`` then ``x + Dropout(MLP(LN2(x)))``.

    ``layer_number`` is 0-based and only names the parameters for initialisation:
    ``transformer.layers.{layer_number}.*``. The layer initialises itself, so a pipeline stage
    holding layers 4-7 gets exactly the weights the full model has there.
    """

    def __init__(
        self,
        config: GLMConfig,
        layer_number: int,
        tp_group: dist.ProcessGroup | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= layer_number < config.num_layers:
            raise ValueError(
                f"layer_number must be in [0, {config.num_layers}), got {layer_number}"
            )
        self.layer_number = layer_number
        self.hidden_dropout = config.hidden_dropout
        self.fused_bias_dropout_add = config.fused_bias_dropout_add
        # sequence parallelism: the residual stream is this rank's slice of the sequence, whose
        # dropout masks must differ from the other ranks' (the model-parallel stream)
        _, tp_size = get_tensor_model_parallel_rank_and_size(tp_group)
        self.sequence_parallel = config.sequence_parallel and tp_size > 1
        self.input_layernorm = make_replicated_layer_norm(config)
        self.attention = ParallelSelfAttention(config, tp_group)
        self.post_attention_layernorm = make_replicated_layer_norm(config)
        self.mlp = ParallelMLP(config, tp_group)
        if init:
            initialize_parameters(self, config, self.canonical_prefix, tp_group)

    @property
    def canonical_prefix(self) -> str:
        return f"transformer.layers.{self.layer_number}."

    def _residual(
        self, out: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
    ) -> torch.Tensor:
        prob = self.hidden_dropout
        drawing = self.sequence_parallel and self.training and prob > 0.0
        with get_rng_tracker().fork() if drawing else contextlib.nullcontext():
            if self.fused_bias_dropout_add:
                return bias_dropout_add(out, bias, residual, prob, self.training)
            return bias_dropout_add_reference(out, bias, residual, prob, self.training)

    def forward(
        self,
        hidden: torch.Tensor,
        sep: torch.Tensor,
        mask: PreparedMask | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """``hidden [b, s, h]``, ``sep [b]`` -> ``[b, s, h]``. ``mask`` is an optional mask
        prepared once per forward (``prepare_attention_mask``) for the same ``sep``;
        ``kv_cache`` this layer's cache in generation (``ParallelSelfAttention.forward``)."""
        out, bias = self.attention(self.input_layernorm(hidden), sep, mask, kv_cache)
        hidden = self._residual(out, bias, hidden)
        out, bias = self.mlp(self.post_attention_layernorm(hidden))
        return self._residual(out, bias, hidden)  # [b, s, h]
