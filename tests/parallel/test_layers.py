"""TP layers at TP=1 are plain PyTorch: no torch.distributed, same math as nn.Linear/Embedding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    gather_full_parameters,
    load_full_parameters,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)


@pytest.fixture(autouse=True)
def _no_process_group() -> None:
    assert not dist.is_initialized(), "TP=1 tests must run without torch.distributed"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_parameter_names_shapes_and_attributes() -> None:
    column = ColumnParallelLinear(4, 6, stride=3)
    row = RowParallelLinear(6, 4)
    embedding = VocabParallelEmbedding(10, 4)
    assert list(column.state_dict()) == ["weight", "bias"]
    assert list(row.state_dict()) == ["weight", "bias"]
    assert list(embedding.state_dict()) == ["weight"]
    assert column.weight.shape == (6, 4) and row.weight.shape == (4, 6)
    assert (column.weight.tensor_model_parallel, column.weight.partition_dim) == (True, 0)
    assert column.weight.partition_stride == 3 and column.bias.partition_stride == 3
    assert (row.weight.tensor_model_parallel, row.weight.partition_dim) == (True, 1)
    assert row.bias.tensor_model_parallel is False
    assert embedding.weight.tensor_model_parallel and embedding.weight.partition_dim == 0
    assert ColumnParallelLinear(4, 6, bias=False).bias is None
    assert RowParallelLinear(4, 6, params_dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_linears_equal_nn_linear() -> None:
    gen = _gen(0)
    w, b = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    x = torch.randn(2, 3, 4, generator=gen)
    expected = F.linear(x, w, b)
    for layer in (
        ColumnParallelLinear(4, 6, stride=3, gather_output=True),
        ColumnParallelLinear(4, 6),
        RowParallelLinear(4, 6, input_is_parallel=False),
    ):
        load_full_parameters(layer, {"weight": w, "bias": b}, None)
        torch.testing.assert_close(layer(x), expected)
    column = ColumnParallelLinear(4, 6, skip_bias_add=True)
    load_full_parameters(column, {"weight": w, "bias": b}, None)
    out, bias = column(x)
    assert bias is column.bias
    torch.testing.assert_close(out, F.linear(x, w))
    row = RowParallelLinear(4, 6, bias=False, skip_bias_add=True)
    load_full_parameters(row, {"weight": w}, None)
    out, bias = row(x)
    assert bias is None
    torch.testing.assert_close(out, F.linear(x, w))


def test_embedding_equals_f_embedding() -> None:
    gen = _gen(1)
    w = torch.randn(10, 4, generator=gen)
    ids = torch.randint(0, 10, (2, 5), generator=gen)
    layer = VocabParallelEmbedding(10, 4)
    load_full_parameters(layer, {"weight": w}, None)
    torch.testing.assert_close(layer(ids), F.embedding(ids, w))


def test_cross_entropy_equals_f_cross_entropy() -> None:
    gen = _gen(2)
    logits = (torch.randn(3, 4, 11, generator=gen) * 20).requires_grad_()
    labels = torch.randint(0, 11, (3, 4), generator=gen)
    reference_in = logits.detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, labels, None)
    expected = F.cross_entropy(reference_in.view(-1, 11), labels.view(-1), reduction="none")
    torch.testing.assert_close(loss, expected.view(3, 4))
    weights = torch.rand(3, 4, generator=gen)
    (loss * weights).sum().backward()
    (expected.view(3, 4) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, reference_in.grad)
    # fp16 logits: computed in fp32 (exp of 20-ish logits overflows fp16).
    half = logits.detach().half()
    torch.testing.assert_close(
        vocab_parallel_cross_entropy(half, labels, None),
        F.cross_entropy(half.float().view(-1, 11), labels.view(-1), reduction="none").view(3, 4),
    )
    with pytest.raises(ValueError, match=r"labels shape \(3,\) must equal .* \(3, 4\)"):
        vocab_parallel_cross_entropy(logits, labels[:, 0], None)


def test_mappings_are_identity_without_group() -> None:
    x = torch.randn(3, 4)
    for mapping in (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
        scatter_to_tensor_model_parallel_region,
        gather_from_tensor_model_parallel_region,
    ):
        assert mapping(x, None) is x


def test_size_and_option_errors() -> None:
    with pytest.raises(ValueError, match="output_size 10 is not divisible by the tensor-parallel"):
        ColumnParallelLinear(4, 10, stride=3)
    with pytest.raises(ValueError, match="gather_output=True with skip_bias_add=True"):
        ColumnParallelLinear(4, 6, gather_output=True, skip_bias_add=True)


def test_load_and_gather_full_parameters() -> None:
    layer = ColumnParallelLinear(4, 6)
    w, b = torch.randn(6, 4), torch.randn(6)
    with pytest.raises(ValueError, match=r"missing \['bias'\], unexpected \['extra'\]"):
        load_full_parameters(layer, {"weight": w, "extra": b}, None)
    with pytest.raises(ValueError, match=r"weight has shape \(6, 4\) .* gives \(6, 5\)"):
        load_full_parameters(layer, {"weight": torch.randn(6, 5), "bias": b}, None)
    load_full_parameters(layer, {"weight": w, "bias": b}, None)
    full = gather_full_parameters(layer, None)
    assert torch.equal(full["weight"], w) and torch.equal(full["bias"], b)
    assert full["weight"].data_ptr() != layer.weight.data_ptr()
    layer(torch.randn(2, 4)).sum().backward()
    grads = gather_full_parameters(layer, None, grads=True)
    torch.testing.assert_close(grads["bias"], torch.full((6,), 2.0))
