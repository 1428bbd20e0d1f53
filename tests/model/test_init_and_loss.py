"""Initialisation (a pure function of seed and canonical name), weight-decay groups and the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.model import (
    GLMEmbedding,
    GLMLayer,
    glm_loss,
    make_replicated_layer_norm,
    param_groups_for_weight_decay,
)


def test_blocks_initialise_like_the_full_model() -> None:
    config = GLMConfig.from_preset("tiny", num_layers=3)
    full = GLMModel(config).state_dict()
    layer = GLMLayer(config, 2)  # a pipeline stage holding only the last layer
    for name, value in layer.state_dict().items():
        assert torch.equal(value, full[f"transformer.layers.2.{name}"]), name
    embedding = GLMEmbedding(config)
    for name, value in embedding.state_dict().items():
        assert torch.equal(value, full[name]), name
    norm = make_replicated_layer_norm(config)
    assert torch.equal(norm.weight, full["transformer.final_layernorm.weight"])
    assert torch.equal(norm.bias, full["transformer.final_layernorm.bias"])


def test_init_depends_on_seed_and_name_only() -> None:
    a = GLMModel(GLMConfig.from_preset("tiny")).state_dict()
    b = GLMModel(GLMConfig.from_preset("tiny")).state_dict()
    c = GLMModel(GLMConfig.from_preset("tiny", seed=7)).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert not torch.equal(a[qkv], c[qkv])
    # different layers are different draws
    assert not torch.equal(a[qkv], a[qkv.replace("layers.0", "layers.1")])


def test_init_distributions() -> None:
    config = GLMConfig.from_preset(
        "tiny", num_layers=8, hidden_size=256, num_attention_heads=4, seed=3
    )
    sd = GLMModel(config).state_dict()
    scaled = 0.02 / math.sqrt(2 * 8)
    for name, value in sd.items():
        if name.endswith("bias"):
            assert torch.equal(value, torch.zeros_like(value)), name
        elif "layernorm" in name:
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            std = (
                scaled
                if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight"))
                else 0.02
            )
            assert value.std().item() == pytest.approx(std, rel=0.05), name
            assert abs(value.mean().item()) < 0.05 * std, name


def test_weight_decay_groups() -> None:
    model = GLMModel(GLMConfig.from_preset("tiny"))
    groups = param_groups_for_weight_decay(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    decay = {names[id(p)] for p in groups[0]["params"]}
    assert no_decay == {n for n in names.values() if n.endswith("bias") or "layernorm" in n}
    assert decay == set(names.values()) - no_decay
    assert "word_embeddings.weight" in decay
    with pytest.raises(ValueError, match="-1"):
        param_groups_for_weight_decay(model, -1)


def test_glm_loss_is_masked_cross_entropy_over_normalizer() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.float32)
    loss = glm_loss(logits, labels, mask, None, 7.0)
    ce = F.cross_entropy(logits.float().reshape(-1, 11), labels.reshape(-1), reduction="none")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (ce * mask.reshape(-1)).sum() / 7.0)
    with pytest.raises(ValueError, match="normalizer must be positive, got 0"):
        glm_loss(logits, labels, mask, None, 0)
    with pytest.raises(ValueError, match="loss_mask"):
        glm_loss(logits, labels, mask[:, :4], None, 1.0)
