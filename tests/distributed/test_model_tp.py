"""GLMModel under tensor parallelism (gloo, separate processes) against the TP=1 model.

Same seed -> the same full initial weights at TP=1/2/4; logits (gathered), loss and every
parameter gradient (gathered to full tensors) agree within 1e-5 relative in fp32; with dropout on,
a TP=2 forward is reproducible run to run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.model import glm_loss
from megatron_glm.parallel import gather_from_tensor_model_parallel_region, gather_full_parameters
from megatron_glm.parallel.random import model_parallel_seed
from tests.distributed.harness import run_distributed

SEED = 1234


def _config(dropout: float = 0.0, **overrides: Any) -> GLMConfig:
    # tiny: 4 heads, padded vocab 1024, both divisible by 4
    return GLMConfig.from_preset(
        "tiny", hidden_dropout=dropout, attention_dropout=dropout, seed=SEED, **overrides
    )


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, s, seps = 2, 16, [6, 11]
    ids = torch.randint(0, 1000, (b, s), generator=g)
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    for i, sep in enumerate(seps):
        pos[i, 0, :sep] = torch.arange(sep)
        pos[i, 0, sep:] = sep - 2
        pos[i, 1, sep:] = torch.arange(1, s - sep + 1)
    mask = (torch.arange(s) >= torch.tensor(seps)[:, None]).float()
    labels = torch.randint(0, 1000, (b, s), generator=g)
    return {"ids": ids, "pos": pos, "sep": torch.tensor(seps), "labels": labels, "mask": mask}


def _forward_backward(group: dist.ProcessGroup | None) -> dict[str, Any]:
    model_parallel_seed(SEED, dist.get_rank(group) if group is not None else 0)
    model = GLMModel(_config(), group)
    initial = gather_full_parameters(model, group)
    data = _batch()
    logits = model(data["ids"], data["pos"], data["sep"])  # [b, s, v/w]
    loss = glm_loss(logits, data["labels"], data["mask"], group, data["mask"].sum())
    loss.backward()
    return {
        "initial": initial,
        "logits": gather_from_tensor_model_parallel_region(logits.detach(), group),
        "loss": loss.detach(),
        "grads": gather_full_parameters(model, group, grads=True),
        "local_vocab": logits.shape[-1],
    }


def _dropout_forward(group: dist.ProcessGroup, train: bool) -> torch.Tensor:
    model_parallel_seed(99, dist.get_rank(group))
    model = GLMModel(_config(dropout=0.1), group).train(train)
    data = _batch()
    with torch.no_grad():
        logits = model(data["ids"], data["pos"], data["sep"])
    return gather_from_tensor_model_parallel_region(logits, group)


def _rank_main(rank: int, world_size: int) -> dict[str, Any] | None:
    group = dist.new_group(list(range(world_size)))
    result = _forward_backward(group)
    if world_size == 2:
        first, second = _dropout_forward(group, True), _dropout_forward(group, True)
        result["dropout_repeat_equal"] = torch.equal(first, second)
        result["dropout_active"] = not torch.allclose(first, _dropout_forward(group, False))
    if world_size == 4:
        errors = []
        for overrides in (
            {"num_attention_heads": 2},
            {"vocab_size": 1026, "make_vocab_size_divisible_by": 2},
        ):
            try:
                GLMModel(_config(**overrides), group)
                errors.append("no error")
            except ValueError as error:
                errors.append(str(error))
        result["build_errors"] = errors
    return result if rank == 0 else None


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _forward_backward(None)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_matches_tp1(world_size: int, reference: dict[str, Any]) -> None:
    result = run_distributed(_rank_main, world_size, timeout=240)[0]
    assert result["local_vocab"] == 1024 // world_size
    assert result["initial"].keys() == reference["initial"].keys()
    for name, value in reference["initial"].items():
        assert torch.equal(result["initial"][name], value), f"initial {name} differs"
    _assert_rel_close(result["logits"], reference["logits"], "logits")
    _assert_rel_close(result["loss"], reference["loss"], "loss")
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, f"{name} has a zero gradient: the comparison would be empty"
        _assert_rel_close(result["grads"][name], grad, f"grad {name}")
    if world_size == 2:
        assert result["dropout_active"]
        assert result["dropout_repeat_equal"]
    if world_size == 4:
        heads, vocab = result["build_errors"]
        assert "tensor-parallel size 4" in heads and "'num_attention_heads': 2" in heads
        assert "'padded_vocab_size': 1026" in vocab
