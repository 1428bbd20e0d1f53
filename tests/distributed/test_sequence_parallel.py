"""Sequence parallelism (docs/parallelism.md#sequence-parallelism) on 2 gloo ranks.

One spawn computes everything (module fixture ``sp_run``), the tests check its parts:

- the sequence-parallel column and row linears against the unpartitioned linear: output, input
  gradient and parameter gradients, with the replicated bias summed by its hook;
- ``GLMModel`` at dropout 0: TP2 + SP equals TP2 without SP and the TP1 model (logits, loss and
  every parameter gradient, gathered to full tensors, within 1e-5 relative), with and without
  activation checkpointing; the replicated gradients are identical on both ranks; also under bf16
  autocast against TP2 without SP;
- dropout: the ranks' sequence slices draw different masks (embedding and residual dropout), the
  run repeats bit for bit, and activation checkpointing recomputes the masks;
- a sequence length that TP does not divide is refused with the values.

The trainer runs (``--sequence-parallel`` with TP2 and with TP2 x PP2) are layouts of
test_layouts.py; the command-line checks are at the end of this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.model import GLMEmbedding, GLMLayer, glm_loss
from megatron_glm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_tensor_model_parallel_region,
    gather_full_parameters,
    load_full_parameters,
    sum_sequence_parallel_gradients,
)
from megatron_glm.parallel.mappings import gather_sequence
from megatron_glm.parallel.random import model_parallel_seed
from megatron_glm.training.arguments import ConfigError, parse_run_config
from tests.distributed.harness import run_distributed
from tests.distributed.test_model_tp import SEED, _assert_rel_close, _batch, _config
from tests.training.helpers import Corpus, pretrain_args, write_ds_config

WORLD = 2


def _forward_backward(
    group: dist.ProcessGroup | None,
    sequence_parallel: bool,
    dropout: float = 0.0,
    checkpoint: bool = False,
    autocast: bool = False,
    seq: int = 16,
) -> dict[str, Any]:
    model_parallel_seed(SEED, dist.get_rank(group) if group is not None else 0)
    config = _config(
        dropout=dropout, sequence_parallel=sequence_parallel, checkpoint_activations=checkpoint
    )
    model = GLMModel(config, group)
    data = {k: v[..., :seq] if k != "sep" else v for k, v in _batch().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(data["ids"], data["pos"], data["sep"])  # [b, s, v/w]
        loss = glm_loss(logits, data["labels"], data["mask"], group, data["mask"].sum())
    loss.backward()
    return {
        "logits": gather_from_tensor_model_parallel_region(logits.detach().float(), group),
        "loss": loss.detach(),
        "grads": gather_full_parameters(model, group, grads=True),
    }


def _linears(group: dist.ProcessGroup, rank: int) -> dict[str, Any]:
    """Both sequence-parallel linears on this rank's slices of one full problem; the full tensors
    come from a generator seeded alike on every rank."""
    g = torch.Generator().manual_seed(7)
    b, s, i, o = 2, 8, 6, 4
    x = torch.randn(b, s, i, generator=g)
    weight, bias = torch.randn(o, i, generator=g), torch.randn(o, generator=g)
    grad_out = torch.randn(b, s, o, generator=g)
    rows = slice(rank * s // WORLD, (rank + 1) * s // WORLD)
    cols_i = slice(rank * i // WORLD, (rank + 1) * i // WORLD)
    cols_o = slice(rank * o // WORLD, (rank + 1) * o // WORLD)
    out: dict[str, Any] = {}

    column = ColumnParallelLinear(i, o, group, sequence_parallel=True)
    load_full_parameters(column, {"weight": weight, "bias": bias}, group)
    x_slice = x[:, rows].clone().requires_grad_()  # [b, s/w, i]
    y = column(x_slice)  # [b, s, o/w]
    y.backward(grad_out[..., cols_o])
    out["column"] = {
        "y": gather_from_tensor_model_parallel_region(y.detach(), group),
        "x_grad": gather_sequence(x_slice.grad, group),
        "grads": gather_full_parameters(column, group, grads=True),
    }

    row = RowParallelLinear(i, o, group, sequence_parallel=True)
    sum_sequence_parallel_gradients(row, group)
    load_full_parameters(row, {"weight": weight, "bias": bias}, group)
    x_cols = x[..., cols_i].clone().requires_grad_()  # [b, s, i/w]
    y = row(x_cols)  # [b, s/w, o]
    y.backward(grad_out[:, rows])
    out["row"] = {
        "y": gather_sequence(y.detach(), group),
        "x_grad": gather_from_tensor_model_parallel_region(x_cols.grad, group),
        "grads": gather_full_parameters(row, group, grads=True),
    }
    return out


def _dropout_slices(group: dist.ProcessGroup, rank: int) -> dict[str, torch.Tensor]:
    """Embedding and layer outputs for inputs that are the same at every position, so that all
    a rank's slice varies by is its dropout masks (p = 0.5)."""
    config = GLMConfig.from_preset(
        "tiny", hidden_dropout=0.5, attention_dropout=0.0, seed=SEED, sequence_parallel=True
    )
    model_parallel_seed(SEED, rank)
    embedding = GLMEmbedding(config, group)
    layer = GLMLayer(config, 0, group)
    b, s = 2, 16
    ids = torch.full((b, s), 5)
    positions = torch.zeros(b, 2, s, dtype=torch.long)
    hidden = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(3))
    hidden = hidden.expand(b, s // WORLD, -1)  # [b, s/w, h], the same on both ranks
    sep = torch.tensor([6, 11])
    with torch.no_grad():
        return {
            "embedding_train": embedding(ids, positions),
            "embedding_eval": embedding.eval()(ids, positions),
            "layer_train": layer(hidden, sep),
            "layer_eval": layer.eval()(hidden, sep),
        }


def _rank_main(rank: int, world_size: int) -> dict[str, Any]:
    group = dist.new_group(list(range(world_size)))
    result: dict[str, Any] = {
        "linears": _linears(group, rank),
        "sp": _forward_backward(group, True),
        "tp": _forward_backward(group, False),
        "sp_recompute": _forward_backward(group, True, checkpoint=True),
        "sp_bf16": _forward_backward(group, True, autocast=True),
        "tp_bf16": _forward_backward(group, False, autocast=True),
        "sp_dropout": _forward_backward(group, True, dropout=0.1),
        "sp_dropout_again": _forward_backward(group, True, dropout=0.1),
        "sp_dropout_recompute": _forward_backward(group, True, dropout=0.1, checkpoint=True),
        "tp_dropout": _forward_backward(group, False, dropout=0.1),
        "slices": _dropout_slices(group, rank),
    }
    try:
        _forward_backward(group, True, seq=15)
        result["odd_length_error"] = "no error"
    except ValueError as error:
        result["odd_length_error"] = str(error)
    return result


@pytest.fixture(scope="module")
def sp_run() -> list[dict[str, Any]]:
    return run_distributed(_rank_main, WORLD, timeout=240)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """The TP1 model; ``sequence_parallel`` has no effect there (checked bit for bit)."""
    plain = _forward_backward(None, False)
    flagged = _forward_backward(None, True)
    assert torch.equal(plain["logits"], flagged["logits"])
    assert all(torch.equal(plain["grads"][k], v) for k, v in flagged["grads"].items())
    return plain


def _assert_same_run(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    _assert_rel_close(got["logits"], want["logits"], f"{what}: logits")
    _assert_rel_close(got["loss"], want["loss"], f"{what}: loss")
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert grad.abs().max() > 0, f"{name} has a zero gradient: the comparison would be empty"
        _assert_rel_close(got["grads"][name], grad, f"{what}: grad {name}")


def test_linears_match_the_unpartitioned_linear(sp_run: list[dict[str, Any]]) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 6, generator=g, requires_grad=True)
    weight = torch.randn(4, 6, generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    y = F.linear(x, weight, bias)
    y.backward(torch.randn(2, 8, 4, generator=g))
    for kind in ("column", "row"):
        got = sp_run[0]["linears"][kind]
        _assert_rel_close(got["y"], y.detach(), f"{kind} output")
        _assert_rel_close(got["x_grad"], x.grad, f"{kind} input gradient")
        _assert_rel_close(got["grads"]["weight"], weight.grad, f"{kind} weight gradient")
        # the row bias acts on sequence slices: right only once its hook summed the ranks
        _assert_rel_close(got["grads"]["bias"], bias.grad, f"{kind} bias gradient")


def test_sp_matches_tp_and_tp1(sp_run: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    result = sp_run[0]
    _assert_same_run(result["tp"], reference, "TP2")
    _assert_same_run(result["sp"], reference, "TP2+SP")
    _assert_same_run(result["sp_recompute"], reference, "TP2+SP, activation checkpointing")


def test_replicated_gradients_are_identical_on_the_tp_ranks(
    sp_run: list[dict[str, Any]],
) -> None:
    first, second = sp_run[0]["sp"]["grads"], sp_run[1]["sp"]["grads"]
    for name, grad in first.items():
        assert torch.equal(grad, second[name]), name


def test_sp_under_bf16_autocast_matches_tp(sp_run: list[dict[str, Any]]) -> None:
    sp, tp = sp_run[0]["sp_bf16"], sp_run[0]["tp_bf16"]
    torch.testing.assert_close(sp["loss"], tp["loss"], rtol=1e-3, atol=0)
    for name, grad in tp["grads"].items():
        assert sp["grads"][name].dtype == torch.float32, name
        scale = grad.abs().max().item()
        torch.testing.assert_close(
            sp["grads"][name], grad, rtol=0, atol=2e-2 * scale, msg=f"bf16 grad {name}"
        )


def test_dropout_differs_per_slice_and_repeats(sp_run: list[dict[str, Any]]) -> None:
    first, second = (r["slices"] for r in sp_run)
    for part in ("embedding", "layer"):
        # position-invariant inputs: without dropout both ranks' slices are equal (up to the
        # rounding of attention averages over different numbers of keys)...
        torch.testing.assert_close(first[f"{part}_eval"], second[f"{part}_eval"], msg=part)
        # ...with it they differ, as the masks of different positions must: by about as much
        # as dropout changes the output (the same masks would leave only rounding)
        gap = (first[f"{part}_train"] - second[f"{part}_train"]).abs().max()
        effect = (first[f"{part}_train"] - first[f"{part}_eval"]).abs().max()
        assert gap > 0.5 * effect > 0, (part, gap, effect)
    result = sp_run[0]
    dropout, again = result["sp_dropout"], result["sp_dropout_again"]
    assert torch.equal(dropout["loss"], again["loss"])
    assert all(torch.equal(dropout["grads"][k], v) for k, v in again["grads"].items())
    assert not torch.allclose(dropout["loss"], result["sp"]["loss"])  # dropout was on
    # SP draws the residual and embedding masks from the per-rank stream: another sample
    assert not torch.allclose(dropout["loss"], result["tp_dropout"]["loss"])
    # activation checkpointing recomputes the same masks
    _assert_same_run(result["sp_dropout_recompute"], dropout, "TP2+SP dropout, recompute")


def test_sequence_not_divisible_by_tp_is_refused(sp_run: list[dict[str, Any]]) -> None:
    message = sp_run[0]["odd_length_error"]
    assert "sequence length 15" in message and "2 tensor-parallel ranks" in message, message


# --- the command line -------------------------------------------------------------------------


def _argv(corpus: Corpus, tmp: Path, *extra: str, seq_length: int = 64) -> list[str]:
    ds = write_ds_config(tmp / "ds.json", train_batch=4, micro=2)
    argv = pretrain_args(corpus, ds, tmp / "log.jsonl", iters=2, bert_prob=1.0, extra=extra)
    for flag in ("--seq-length", "--max-position-embeddings"):
        argv[argv.index(flag) + 1] = str(seq_length)
    return argv


def test_flag_and_layout_checks(tmp_path: Path, glm_corpus: Corpus) -> None:
    tp2 = ("--tensor-model-parallel-size", "2", "--sequence-parallel")
    run = parse_run_config(_argv(glm_corpus, tmp_path, *tp2), 2, cuda=False)
    assert run.model.sequence_parallel and run.data.input_length == 82
    assert "pipeline" not in run.ds.config

    # seq-length 63: the model input is 81 tokens
    with pytest.raises(ConfigError) as info:
        parse_run_config(_argv(glm_corpus, tmp_path, *tp2, seq_length=63), 2, cuda=False)
    (problem,) = info.value.problems
    assert "model input of 81 tokens" in problem and "--seq-length 64 gives 82" in problem

    run = parse_run_config(_argv(glm_corpus, tmp_path, "--sequence-parallel"), 1, cuda=False)
    assert any("no effect at tensor-model-parallel-size 1" in note for note in run.notes)

    # with a pipeline DeepSpeed must send each rank's own slice between the stages
    pp2 = (*tp2, "--pipeline-model-parallel-size", "2")
    run = parse_run_config(_argv(glm_corpus, tmp_path, *pp2), 4, cuda=False)
    assert run.ds.config["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    argv = _argv(glm_corpus, tmp_path, *pp2)
    write_ds_config(
        Path(argv[argv.index("--deepspeed_config") + 1]),
        train_batch=4,
        micro=2,
        pipeline={"pipe_partitioned": True},
    )
    with pytest.raises(ConfigError) as info:
        parse_run_config(argv, 4, cuda=False)
    (problem,) = info.value.problems
    assert "pipeline.pipe_partitioned" in problem and "--sequence-parallel" in problem
