"""Stopping a broken run (megatron_glm/training/guards.py).

- The agreement: a non-finite loss or gradient on one rank vetoes the update on every rank and
  names that rank; a stop request on one rank reaches every rank.
- The verdict: fp16 overflow skips are counted and stop the run past ``--max-skipped-steps`` in a
  row; a skip in bf16/fp32 or a non-finite gradient norm is broken; the loss-spike guard warns or
  stops.
- The real trainer, bf16 and fp32, two data-parallel ranks, ``step.loss:nan`` on rank 1 at
  iteration 3: every rank's update of that iteration is vetoed, the parameters stay bit for bit.
- ``pretrain_glm.py`` with the same fault: both ranks exit with status 3 at iteration 3, nothing
  is saved for it, and the checkpoint before it is kept from pruning.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_glm.training.faults import FAULT_ENV
from megatron_glm.training.guards import ExitCode, FailureConfig, StepGuard
from tests.distributed.harness import run_distributed
from tests.training.helpers import Corpus, launch, pretrain_args, read_log, write_ds_config

NAN_ITERATION = 3


def _agreement(rank: int, world_size: int) -> list[tuple[bool, bool, list[int], list[int]]]:
    outcomes = []
    # (fault spec, rank asking to stop, this rank's gradient)
    cases = [
        (f"step.loss:nan@rank=1,iteration={NAN_ITERATION}", None, 1.0),
        ("", 0, 1.0),
        ("", None, float("inf") if rank == 0 else 1.0),
    ]
    for spec, stop_rank, grad in cases:
        os.environ[FAULT_ENV] = spec
        guard = StepGuard(FailureConfig(), "bf16", lambda r=stop_rank: r == rank)
        guard.begin(NAN_ITERATION)
        guard.observe_loss(torch.tensor(2.0))
        allowed = guard.allow_update([torch.full((3,), grad), None])
        outcomes.append(
            (allowed, guard.stop_agreed, guard.nonfinite_loss_ranks, guard.nonfinite_grad_ranks)
        )
    return outcomes


def test_every_rank_agrees_on_a_veto_and_a_stop() -> None:
    results = run_distributed(_agreement, 2, timeout=60)
    assert results[0] == results[1]
    nan_loss, stop, inf_grad = results[0]
    assert nan_loss == (False, False, [1], [])
    assert stop == (True, True, [], [])
    assert inf_grad == (False, False, [], [0])


def _verdicts(rank: int, world_size: int) -> dict[str, list[str | None]]:
    def run(guard: StepGuard, steps: list[tuple[float, float | None, bool]]) -> list[str | None]:
        out = []
        for iteration, (loss, norm, applied) in enumerate(steps, 1):
            guard.begin(iteration)
            guard.allow_update([])
            broken = guard.verdict(loss, norm, applied, 1.0)
            out.append(None if broken is None else str(broken))
        return out

    never = lambda: False  # noqa: E731
    fp16 = StepGuard(FailureConfig(max_skipped_steps=2), "fp16", never)
    spike = FailureConfig(loss_spike_factor=2.0, loss_spike_window=2)
    return {
        "fp16": run(
            fp16,
            [(5.0, 1.0, False), (5.0, None, False), (5.0, 1.0, True)] * 2
            + [(5.0, None, False)] * 3,
        ),
        "bf16_skip": run(StepGuard(FailureConfig(), "bf16", never), [(5.0, None, False)]),
        "fp32_norm": run(StepGuard(FailureConfig(), "fp32", never), [(5.0, float("nan"), True)]),
        "spike_warn": run(
            StepGuard(spike, "fp32", never), [(4.0, 1.0, True)] * 2 + [(9.0, 1.0, True)]
        ),
        "spike_stop": run(
            StepGuard(
                FailureConfig(loss_spike_factor=2.0, loss_spike_window=2, loss_spike_action="stop"),
                "fp32",
                never,
            ),
            [(4.0, 1.0, True), (4.0, 1.0, True), (7.9, 1.0, True), (20.0, 1.0, True)],
        ),
    }


def test_verdicts() -> None:
    (v,) = run_distributed(_verdicts, 1, timeout=60)
    # two skips in a row are allowed, the third is one too many; a good step resets the count
    assert v["fp16"][:8] == [None] * 8
    assert "3 fp16 updates in a row skipped" in v["fp16"][8]
    assert "--max-skipped-steps 2" in v["fp16"][8]
    assert "optimizer found non-finite gradients" in v["bf16_skip"][0]
    assert "gradient norm is nan" in v["fp32_norm"][0]
    assert v["spike_warn"] == [None, None, None]
    assert v["spike_stop"][:3] == [None, None, None]  # 7.9 < 2 x 4: not a spike
    assert "loss spike: 20 > 2 x 5.95" in v["spike_stop"][3]


def test_failure_flags_are_checked() -> None:
    problems = FailureConfig(
        max_skipped_steps=0,
        loss_spike_factor=0.5,
        loss_spike_window=0,
        loss_spike_action="panic",
        distributed_timeout_minutes=0,
    ).problems()
    assert len(problems) == 5, problems


def _trainer_update_vetoed(
    rank: int, world_size: int, argvs: dict[str, list[str]]
) -> dict[str, tuple[list[int], bool, bool, float]]:
    from megatron_glm.parallel.topology import ParallelTopology
    from megatron_glm.tasks.pretraining import GLMPretraining
    from megatron_glm.training.arguments import parse_run_config
    from megatron_glm.training.engine import Trainer
    from megatron_glm.training.loop import _loader

    os.environ[FAULT_ENV] = f"step.loss:nan@rank=1,iteration={NAN_ITERATION}"
    out = {}
    for name, argv in argvs.items():
        run = parse_run_config(argv, world_size)
        groups = ParallelTopology(world_size, 1, 1).build_groups(rank)
        task = GLMPretraining(run)
        data = task.build_data(groups)
        guard = StepGuard(run.failure, run.ds.precision, lambda: False)
        trainer = Trainer(run, groups, task, guard)
        batches = _loader(run, groups, data.train, data.collator, 0, 0)
        params = trainer.engine.module.parameters
        for iteration in range(1, NAN_ITERATION + 1):
            guard.begin(iteration)
            before = [p.detach().clone() for p in params()]
            stats = trainer.train_step([next(batches) for _ in range(trainer.gas)])
            guard.verdict(stats.loss, stats.grad_norm, stats.applied, stats.loss_scale)
            unchanged = all(torch.equal(a, p) for a, p in zip(before, params(), strict=True))
            if iteration < NAN_ITERATION:
                assert stats.applied and not unchanged, (name, iteration)
        out[name] = (guard.nonfinite_loss_ranks, stats.applied, unchanged, stats.loss)
    return out


def test_non_finite_loss_on_one_rank_leaves_every_rank_unchanged(
    glm_corpus: Corpus, tmp_path: Path
) -> None:
    argvs = {}
    for precision in ("fp32", "bf16"):
        ds = write_ds_config(
            tmp_path / f"{precision}.json", train_batch=4, micro=2, bf16=precision == "bf16"
        )
        argvs[precision] = pretrain_args(
            glm_corpus,
            ds,
            tmp_path / "unused.jsonl",
            iters=NAN_ITERATION,
            bert_prob=0.5,
            extra=["--data-cache-dir", str(tmp_path / "cache")],
        )
    results = run_distributed(_trainer_update_vetoed, 2, argvs, timeout=240)
    for rank_result in results:
        for precision in ("fp32", "bf16"):
            nonfinite_ranks, applied, unchanged, loss = rank_result[precision]
            assert nonfinite_ranks == [1], precision
            assert not applied and unchanged, precision
    # the reported loss is the data-parallel mean: NaN on both ranks
    assert all(r["fp32"][3] != r["fp32"][3] for r in results)


def test_pretrain_stops_with_status_3_and_keeps_the_last_checkpoint(
    glm_corpus: Corpus, tmp_path: Path
) -> None:
    from megatron_glm.training.checkpointing import find_latest_checkpoint

    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=2)
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    args = pretrain_args(
        glm_corpus,
        ds,
        log,
        iters=5,
        bert_prob=0.5,
        extra=["--save", str(ckpt), "--save-interval", "1", "--keep-last-k", "1"],
    )
    fault = {FAULT_ENV: f"step.loss:nan@rank=1,iteration={NAN_ITERATION}"}
    result = launch(2, args, log_dir=tmp_path, env=fault, timeout=240)
    assert result.returncodes == [ExitCode.BROKEN] * 2, result.describe()
    assert f"training stopped at iteration {NAN_ITERATION}" in result.outputs[0]
    # rank 1's NaN reaches rank 0's gradients through their data-parallel reduction
    assert (
        "non-finite loss on rank(s) 1; non-finite gradients on rank(s) 0, 1" in (result.outputs[0])
    )
    records = read_log(log)
    assert [r["step"] for r in records] == list(range(1, NAN_ITERATION + 1))
    assert records[-1]["loss"] is None and records[-1]["loss_hex"] == "nan"
    latest = find_latest_checkpoint(ckpt)
    assert latest is not None and latest.iteration == NAN_ITERATION - 1
    assert not (ckpt / str(NAN_ITERATION)).exists()
    assert (latest.path / "KEEP").is_file()
    assert not (ckpt / "run.lock").exists()
