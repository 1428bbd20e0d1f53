"""GLMModel (TP=1) against an independent float64 transcription of the formulas of
docs/model.md#architecture and docs/model.md#inputs-2d-positions-and-the-mask, written from the
canonical state dict alone: pre-LN order, LayerNorm eps 1e-5, the tanh GeLU
constants, the [Q all heads; K all heads; V all heads] row order of ``query_key_value``,
``scores = Q (K / sqrt(d))^T`` with -65504 on masked keys, ``j < sep or j <= i``, the tied head
without bias. Every parameter (biases and LayerNorms included) is perturbed first, so a dropped
bias or a LayerNorm applied in the wrong place shows up.

Shape legend: b batch, s sequence, h hidden, n heads, d head dim, v padded vocab.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm import GLMConfig, GLMModel


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def reference_logits(
    sd: dict[str, torch.Tensor],
    config: GLMConfig,
    ids: torch.Tensor,
    pos: torch.Tensor,
    sep: torch.Tensor,
) -> torch.Tensor:
    """``ids [b, s]``, ``pos [b, 2, s]``, ``sep [b]`` -> ``[b, s, v]`` in float64."""
    p = {k: v.double() for k, v in sd.items()}
    eps, n = 1e-5, config.num_attention_heads
    b, s = ids.shape
    h = config.hidden_size
    d = h // n
    x = (
        p["word_embeddings.weight"][ids]
        + p["transformer.position_embeddings.weight"][pos[:, 0]]
        + p["transformer.block_position_embeddings.weight"][pos[:, 1]]
    )  # [b, s, h]
    i = torch.arange(s).view(1, s, 1)
    j = torch.arange(s).view(1, 1, s)
    allowed = ((j < sep.view(b, 1, 1)) | (j <= i)).unsqueeze(1)  # [b, 1, s, s]
    for layer in range(config.num_layers):
        q_ = f"transformer.layers.{layer}."
        a = _layer_norm(x, p[q_ + "input_layernorm.weight"], p[q_ + "input_layernorm.bias"], eps)
        w, bias = (
            p[q_ + "attention.query_key_value.weight"],
            p[q_ + "attention.query_key_value.bias"],
        )
        heads = []
        for head in range(n):
            rows = [slice(part * h + head * d, part * h + (head + 1) * d) for part in range(3)]
            q, k, v = (a @ w[r].T + bias[r] for r in rows)  # 3 x [b, s, d]
            scores = q @ (k / math.sqrt(d)).transpose(-1, -2)  # [b, s, s]
            scores = scores.masked_fill(~allowed[:, 0], -65504.0)
            heads.append(torch.softmax(scores, dim=-1) @ v)  # [b, s, d]
        context = torch.cat(heads, dim=-1)  # [b, s, h], head j at columns j*d:(j+1)*d
        x = x + context @ p[q_ + "attention.dense.weight"].T + p[q_ + "attention.dense.bias"]
        m = _layer_norm(
            x,
            p[q_ + "post_attention_layernorm.weight"],
            p[q_ + "post_attention_layernorm.bias"],
            eps,
        )
        inner = _gelu_tanh(
            m @ p[q_ + "mlp.dense_h_to_4h.weight"].T + p[q_ + "mlp.dense_h_to_4h.bias"]
        )
        x = x + inner @ p[q_ + "mlp.dense_4h_to_h.weight"].T + p[q_ + "mlp.dense_4h_to_h.bias"]
    out = _layer_norm(
        x, p["transformer.final_layernorm.weight"], p["transformer.final_layernorm.bias"], eps
    )
    return out @ p["word_embeddings.weight"].T  # tied, no output bias


@pytest.mark.parametrize("backend", ["dense", "sdpa"])
def test_model_matches_the_spec_formulas(backend: str) -> None:
    config = GLMConfig.from_preset(
        "tiny", hidden_dropout=0.0, attention_dropout=0.0, attention_backend=backend
    )
    model = GLMModel(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            # biases and LayerNorm params move off 0 / 1 (LN gains stay O(1)); larger weights make
            # the layers matter: an LN eps of 1e-6 or the erf GeLU moves logits by >= 3.6e-4
            noise = torch.randn(param.shape, generator=g) * (0.3 if param.dim() == 1 else 0.1)
            param.add_(noise)
    b, s, seps = 2, 12, (5, 9)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=g)
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    for row, sep in enumerate(seps):
        pos[row, 0, :sep] = torch.arange(sep)
        pos[row, 0, sep:] = sep - 1
        pos[row, 1, sep:] = torch.arange(1, s - sep + 1)
    sep_t = torch.tensor(seps)
    with torch.no_grad():
        got = model(ids, pos, sep_t).double()
    expected = reference_logits(model.state_dict(), config, ids, pos, sep_t)
    assert got.shape == (b, s, config.padded_vocab_size)
    torch.testing.assert_close(got, expected, rtol=0.0, atol=2e-5)
