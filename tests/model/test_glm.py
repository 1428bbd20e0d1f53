"""GLMModel at TP=1: canonical names, parameter counts, the Part A / Part B mask, input validation,
activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.model import glm_loss
from megatron_glm.parallel.random import model_parallel_seed

LAYER_NAMES = [
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
]  # fmt: skip


def canonical_names(num_layers: int) -> list[str]:
    names = [
        "word_embeddings.weight",
        "transformer.position_embeddings.weight",
        "transformer.block_position_embeddings.weight",
    ]
    for i in range(num_layers):
        names += [f"transformer.layers.{i}.{name}" for name in LAYER_NAMES]
    return names + ["transformer.final_layernorm.weight", "transformer.final_layernorm.bias"]


def tiny(**overrides: object) -> GLMConfig:
    values = dict(hidden_dropout=0.0, attention_dropout=0.0)
    values.update(overrides)
    return GLMConfig.from_preset("tiny", **values)


def batch(
    config: GLMConfig, b: int = 2, s: int = 12, seps: tuple[int, ...] = (5, 8), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=g)
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    for i, sep in enumerate(seps):
        # Part A positions 0..sep-1, block 0; Part B: one span at the mask position, block 1..
        pos[i, 0, :sep] = torch.arange(sep)
        pos[i, 0, sep:] = sep - 1
        pos[i, 1, sep:] = torch.arange(1, s - sep + 1)
    return ids, pos, torch.tensor(seps)


def test_state_dict_keys_are_exactly_the_canonical_names() -> None:
    model = GLMModel(tiny())
    assert list(model.state_dict().keys()) == canonical_names(2)
    qkv = model.state_dict()["transformer.layers.0.attention.query_key_value.weight"]
    assert tuple(qkv.shape) == (3 * 64, 64)  # [out, in]


def test_tiny_parameter_count_matches_config() -> None:
    config = tiny()
    model = GLMModel(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    no_block = GLMConfig.from_preset("tiny", block_position_encoding=False)
    model = GLMModel(no_block)
    assert "transformer.block_position_embeddings.weight" not in model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == no_block.num_parameters()


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("base", "109.3M"),
        ("large", "334.7M"),
        ("410m", "410.3M"),
        ("515m", "514.6M"),
        ("2b", "1.92B"),
        ("10b", "9.88B"),
    ],
)
def test_preset_parameter_counts(preset: str, expected: str) -> None:
    config = GLMConfig.from_preset(preset)
    with torch.device("meta"):  # real module structure, no storage
        model = GLMModel(config)
    actual = sum(p.numel() for p in model.parameters())
    assert actual == config.num_parameters()
    shown = f"{actual / 1e9:.2f}B" if actual >= 1e9 else f"{actual / 1e6:.1f}M"
    assert shown == expected
    assert list(model.state_dict().keys()) == canonical_names(config.num_layers)


def _outputs(
    model: GLMModel, ids: torch.Tensor, pos: torch.Tensor, sep: torch.Tensor
) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, pos, sep)


@pytest.mark.parametrize("backend", ["dense", "sdpa", "flex"])
def test_part_b_never_changes_part_a(backend: str) -> None:
    model = GLMModel(tiny(attention_backend=backend)).eval()
    ids, pos, sep = batch(model.config)
    base = _outputs(model, ids, pos, sep)
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 7) % 1000  # all of sample 0's Part B (sep 5)
    changed[1, 10] = (changed[1, 10] + 3) % 1000  # a later Part B token of sample 1 (sep 8)
    out = _outputs(model, changed, pos, sep)
    torch.testing.assert_close(out[0, :5], base[0, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0, 5:], base[0, 5:])
    # earlier Part B positions (8, 9) and Part A are unchanged; position 10 and on change
    torch.testing.assert_close(out[1, :10], base[1, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(out[1, 10:], base[1, 10:])


def test_changing_part_a_changes_part_b_and_part_a() -> None:
    # the mask is not too strict: Part A is bidirectional and visible to Part B
    model = GLMModel(tiny()).eval()
    ids, pos, sep = batch(model.config)
    base = _outputs(model, ids, pos, sep)
    changed = ids.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 1000  # last Part A token of sample 0
    out = _outputs(model, changed, pos, sep)
    assert not torch.allclose(out[0, 0], base[0, 0])  # an earlier Part A token sees it
    assert not torch.allclose(out[0, 6], base[0, 6])  # Part B sees it


def test_padding_after_part_b_is_invisible() -> None:
    model = GLMModel(tiny()).eval()
    ids, pos, sep = batch(model.config, s=10, seps=(4, 6))
    base = _outputs(model, ids, pos, sep)
    padded_ids = torch.cat([ids, torch.full((2, 5), 3)], dim=1)
    padded_pos = torch.cat([pos, torch.zeros(2, 2, 5, dtype=torch.long)], dim=2)
    out = _outputs(model, padded_ids, padded_pos, sep)
    torch.testing.assert_close(out[:, :10], base, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_value_errors() -> None:
    model = GLMModel(tiny())
    ids, pos, sep = batch(model.config)
    with pytest.raises(ValueError, match=r"input_ids must have shape \[\?, \?\], got \(24,\)"):
        model(ids.flatten(), pos, sep)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor, got dtype"):
        model(ids.float(), pos, sep)
    with pytest.raises(
        ValueError, match=r"position_ids must have shape \[2, 2, 12\], got \(2, 12\)"
    ):
        model(ids, pos[:, 0], sep)
    with pytest.raises(ValueError, match="position_ids must be an integer"):
        model(ids, pos.float(), sep)
    with pytest.raises(ValueError, match=r"sep must have shape \[2\], got \(2, 1\)"):
        model(ids, pos, sep[:, None])
    with pytest.raises(ValueError, match=r"sep must lie in \[0, 12\].*\[5, 13\]"):
        model(ids, pos, torch.tensor([5, 13]))
    with pytest.raises(ValueError, match=r"sep must lie in \[0, 12\].*\[-1, 3\]"):
        model(ids, pos, torch.tensor([-1, 3]))
    bad_pos = pos.clone()
    bad_pos[1, 1, 3] = 129
    with pytest.raises(ValueError, match=r"position ids must lie in \[0, 129\).*max 129"):
        model(ids, bad_pos, sep)
    bad_ids = ids.clone()
    bad_ids[0, 0] = 1024
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 1024\).*max 1024"):
        model(bad_ids, pos, sep)
    bad_ids[0, 0] = -2
    with pytest.raises(ValueError, match="min -2"):
        model(bad_ids, pos, sep)
    with pytest.raises(ValueError, match="flex.*attention_dropout=0.1"):
        GLMModel(GLMConfig.from_preset("tiny", attention_backend="flex"))


def _loss_and_grads(config: GLMConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model_parallel_seed(123, 0)
    model = GLMModel(config).train()
    ids, pos, sep = batch(config, s=16, seps=(6, 9), seed=1)
    labels = torch.roll(ids, -1, dims=1)
    mask = (torch.arange(16) >= torch.tensor([[6], [9]])).float()
    loss = glm_loss(model(ids, pos, sep), labels, mask, None, mask.sum())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 2])
def test_activation_checkpointing_gives_same_loss_and_grads(chunk: int) -> None:
    dropout = dict(hidden_dropout=0.1, attention_dropout=0.1)
    loss, grads = _loss_and_grads(GLMConfig.from_preset("tiny", **dropout))
    loss_ckpt, grads_ckpt = _loss_and_grads(
        GLMConfig.from_preset(
            "tiny", checkpoint_activations=True, checkpoint_num_layers=chunk, **dropout
        )
    )
    no_dropout, _ = _loss_and_grads(tiny())
    assert not torch.allclose(loss, no_dropout)  # dropout really was active
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_recomputation_changes_nothing_but_memory(dtype: torch.dtype) -> None:
    """recompute_attention_core on or off: the same loss and gradients bit for bit, dropout on
    (the mask replayed in backward is the forward's)."""
    results = []
    for recompute in (True, False):
        config = GLMConfig.from_preset(
            "tiny", attention_backend="fused", recompute_attention_core=recompute
        )
        model = GLMModel(config).to(dtype).train()
        ids, pos, sep = batch(config)
        model_parallel_seed(3, 0)  # both streams: the default and the tracker's
        out = model(ids, pos, sep)
        out.float().square().mean().backward()
        results.append([out.detach(), *(p.grad for p in model.parameters())])
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_backends_and_fused_ops_agree_inside_the_model() -> None:
    ids, pos, sep = batch(tiny())
    reference = GLMModel(
        tiny(attention_backend="dense", fused_bias_gelu=False, fused_bias_dropout_add=False)
    )
    expected = reference(ids, pos, sep)
    expected.square().mean().backward()
    for overrides in (
        {"attention_backend": "sdpa"},
        {"attention_backend": "dense"},
        {"attention_backend": "fused"},
    ):
        model = GLMModel(tiny(**overrides))  # fused ops on
        out = model(ids, pos, sep)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        flex = GLMModel(tiny(attention_backend="flex"))(ids, pos, sep)
    torch.testing.assert_close(flex, expected.detach(), rtol=1e-5, atol=1e-5)
