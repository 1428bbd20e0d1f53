"""The official GLM's model step, re-expressed in plain eager PyTorch: the baseline of run_all.py.

What it does the way the 2021 code (THUDM/GLM ``mpu/transformer.py``, ``model/modeling_glm.py``)
does it on one process, so the comparison is against that code's arithmetic and memory traffic,
not against a straw man:

- a float ``[b, 1, s, s]`` mask built per forward from ``sep`` and applied as
  ``scores * m + (-65504) * (1 - m)`` (three full passes over the scores), softmax, dropout on the
  probabilities (``nn.Dropout``: a Bernoulli draw per element), ``@ v``;
- Q, K and V split off the fused projection and permuted separately;
- each linear adds its own bias; GeLU is the unfused tanh formula; dropout and the residual add
  are separate ops; LayerNorm is ``nn.LayerNorm``;
- the tied LM head, and the loss ``cross_entropy(logits.float())`` with a loss mask.

Parameter names are the canonical ones, so ``Baseline(config).load_state_dict(model.state_dict())``
takes a ``GLMModel``'s weights; ``tests/model/test_baseline.py`` checks the two agree in fp32
without dropout. Where torch has no bf16 matrix product for the CPU (AVX2 only), ``ProductsInFp32``
gives the baseline the same fp32-arithmetic products the model uses there
(megatron_glm/kernels/matmul.py) instead of torch's ~40x slower fallback loop. Shape legend: b batch, s sequence, h hidden, n heads, d head dim, v vocab.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from megatron_glm.config import GLMConfig
from megatron_glm.kernels.matmul import linear, matmul

__all__ = ["Baseline", "ProductsInFp32", "baseline_loss"]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class _Attention(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # [b, n, s, d]

    def forward(self, x: torch.Tensor, ltor_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(t) for t in torch.chunk(self.query_key_value(x), 3, dim=-1))
        scores = torch.matmul(q, k.transpose(-1, -2) / math.sqrt(self.head_dim))  # [b, n, s, s]
        scores = torch.mul(scores, ltor_mask)
        scores = scores + (-65504.0) * (1.0 - ltor_mask)
        probs = self.attention_dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()  # [b, s, n, d]
        context = context.view(*context.shape[:-2], -1)  # [b, s, h]
        return self.output_dropout(self.dense(context))


class _MLP(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        assert config.ffn_hidden_size is not None
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense_4h_to_h(_gelu(self.dense_h_to_4h(x))))


class _Layer(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = _Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = _MLP(config)

    def forward(self, x: torch.Tensor, ltor_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x), ltor_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Transformer(nn.Module):
    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        rows, h = config.max_sequence_length + 1, config.hidden_size
        self.position_embeddings = nn.Embedding(rows, h)
        self.block_position_embeddings = nn.Embedding(rows, h)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)


class Baseline(nn.Module):
    """``Baseline(config)(ids [b,s], pos [b,2,s], sep [b]) -> logits [b, s, v]`` (TP = 1)."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        if not config.block_position_encoding:
            raise ValueError("the baseline implements block_position_encoding=True only")
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.transformer = _Transformer(config)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        s = ids.shape[1]
        x = self.word_embeddings(ids) + t.position_embeddings(pos[:, 0])
        x = t.embedding_dropout(x + t.block_position_embeddings(pos[:, 1]))  # [b, s, h]
        # The official get_masks: lower triangle, plus every row sees the first sep columns.
        ltor_mask = torch.ones(s, s, dtype=x.dtype, device=x.device).tril().expand(len(sep), s, s)
        ltor_mask = ltor_mask.clone()
        columns = torch.arange(s, device=x.device).view(1, 1, s)
        ltor_mask[(columns < sep.view(-1, 1, 1)).expand_as(ltor_mask)] = 1.0
        ltor_mask = ltor_mask.unsqueeze(1)  # [b, 1, s, s]
        for layer in t.layers:
            x = layer(x, ltor_mask)
        return F.linear(t.final_layernorm(x), self.word_embeddings.weight)  # [b, s, v]


class ProductsInFp32(TorchFunctionMode):
    """Inside it, ``F.linear`` and ``torch.matmul`` (the baseline's only products) run through
    ``megatron_glm.kernels.matmul``, which computes 16-bit products in fp32 where torch has no fast
    16-bit product for the CPU and leaves every other product to torch."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            return linear(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not kwargs:
            return matmul(*args)
        return func(*args, **kwargs)


def baseline_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """The official pretraining loss: fp32 cross entropy per token, masked, over the mask sum."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    mask = loss_mask.flatten().float()
    return (losses * mask).sum() / mask.sum()
