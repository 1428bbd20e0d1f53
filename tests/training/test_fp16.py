"""fp16 with DeepSpeed's dynamic loss scaling, at ZeRO stage 0 and 1: overflowing steps are
skipped, counted and halve the scale; the model does not change on a skipped step; training then
proceeds; and stage 0 makes the same updates as stage 1.

DeepSpeed 0.19.8 refuses fp16 on a CPU without native fp16 ("Type fp16 is not supported on your
device."), and so does our configuration check (tested below). The training tests simulate a CPU
with native fp16 (``fp16_hooks.simulate_cpu_fp16``: only DeepSpeed's capability query changes;
the parameters are fp16 and the forward/backward run in torch's CPU fp16 kernels).

ZeRO stage 0 needs the trainer's workaround (docs/training.md, "fp16"): DeepSpeed 0.19.8's
``engine.backward`` does not apply the loss scale for its non-ZeRO fp16 optimizers, whose
``step()`` still divides by it; the trainer applies it when it sees that DeepSpeed did not. Without
it, no step at stage 0 would overflow and every update would shrink by the scale, so the
stage-0 runs below could match neither the overflow pattern nor the stage-1 updates. The trainer
also undoes the zero-gradient Adam step with which those optimizers prime their state, and gives
``FP16_UnfusedOptimizer`` the right norm to clip by under TP/PP; both are tested through the same
comparisons (stage 0 against stage 1, PP 2 against PP 1, and the clipping divisor DeepSpeed
applied). Stage 0 runs with ``FP16_UnfusedOptimizer`` (what a CPU gets) and, simulated, with
``FP16_Optimizer`` (what CUDA gets with FusedAdam). A run with DeepSpeed's backward patched to
scale the loss itself (as upstream pull request 8393 does) shows the trainer then leaves the scale
to DeepSpeed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_glm.training.arguments import ConfigError, parse_run_config
from megatron_glm.training.engine import loss_scale_factor
from tests.training.helpers import (
    REPO,
    Corpus,
    launch,
    pretrain_args,
    read_log,
    write_ds_config,
)

ITERS = 12
INITIAL_SCALE_POWER = 20  # 2**20: the tiny model's fp16 gradients overflow until about 2**16
DEEPSPEED_SCALES = "DeepSpeed applies the loss scale itself"
TRAINER_SCALES = "DeepSpeed does not apply the loss scale in engine.backward"


def _fp16_config(path: Path, zero_stage: int = 1) -> Path:
    return write_ds_config(
        path,
        train_batch=4,
        micro=4,
        zero_stage=zero_stage,
        lr=2e-3,
        # hysteresis 1: every overflow halves the scale (DeepSpeed's default 2 lets the first
        # overflow after a good stretch pass without lowering it)
        fp16={
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": INITIAL_SCALE_POWER,
            "hysteresis": 1,
        },
    )


def test_fp16_refused_on_cpu_without_native_fp16(tmp_path: Path, glm_corpus: Corpus) -> None:
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        pytest.skip("this CPU has native fp16: DeepSpeed accepts fp16 here")
    config = _fp16_config(tmp_path / "ds.json")
    argv = pretrain_args(glm_corpus, config, tmp_path / "log.jsonl", iters=1, bert_prob=1.0)
    with pytest.raises(ConfigError) as err:
        parse_run_config(argv, 1, cuda=False)
    assert "Type fp16 is not supported on your device" in str(err.value)


def test_loss_scale_factor() -> None:
    scale = 2.0**16
    for gas in (1, 3, 8):
        assert loss_scale_factor(1 / gas, gas, scale) == scale  # DeepSpeed did not scale
        assert loss_scale_factor(scale / gas, gas, scale) == 1.0  # it did: do not scale twice
        with pytest.raises(RuntimeError, match="expected"):
            loss_scale_factor(4.0 / gas, gas, scale)


@dataclass
class Run:
    records: list[dict[str, Any]]  # the --log-json train records
    params: list[dict[str, Any]]  # rank 0's fp16_hooks.record_params lines
    output: str  # every rank's output
    param_log: Path

    def weights(self, iteration: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(f"{self.param_log}.rank0.iter{iteration}.safetensors")


RunFn = Callable[..., Run]


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory: pytest.TempPathFactory, glm_corpus: Corpus) -> RunFn:
    """``fp16_run(zero_stage, pp=1, deepspeed_scales=False, fused=False)``: one tiny fp16 training
    run of ``ITERS`` iterations on a simulated fp16 CPU, launched once per module and layout;
    ``deepspeed_scales``: with DeepSpeed's backward scaling the loss at stage 0 itself; ``fused``:
    with ``FP16_Optimizer`` at stage 0 (see fp16_hooks)."""
    runs: dict[tuple[int, int, bool, bool], Run] = {}

    def run(
        zero_stage: int, pp: int = 1, deepspeed_scales: bool = False, fused: bool = False
    ) -> Run:
        key = (zero_stage, pp, deepspeed_scales, fused)
        if key in runs:
            return runs[key]
        tmp = tmp_path_factory.mktemp(
            f"fp16_z{zero_stage}_pp{pp}_{int(deepspeed_scales)}{int(fused)}"
        )
        site = tmp / "site"
        site.mkdir()
        setup = ["from tests.training import fp16_hooks", "fp16_hooks.simulate_cpu_fp16()"]
        if deepspeed_scales:
            setup.append("fp16_hooks.simulate_deepspeed_stage0_loss_scaling()")
        if fused:
            setup.append("fp16_hooks.simulate_fused_fp16_optimizer()")
        (site / "sitecustomize.py").write_text("\n".join(setup) + "\n")
        log = tmp / "log.jsonl"
        args = pretrain_args(
            glm_corpus,
            _fp16_config(tmp / "ds.json", zero_stage),
            log,
            iters=ITERS,
            bert_prob=1.0,
            extra=[
                "--hidden-dropout",
                "0",
                "--attention-dropout",
                "0",
                "--pipeline-model-parallel-size",
                str(pp),
            ],
        )
        env = {
            "PYTHONPATH": f"{REPO}:{site}",
            "MEGATRON_GLM_HOOKS": "tests.training.fp16_hooks:record_params",
            "FP16_PARAM_LOG": str(tmp / "params"),
        }
        result = launch(pp, args, env=env, log_dir=tmp)
        assert result.ok, result.describe()
        with open(f"{tmp / 'params'}.rank0", encoding="utf-8") as f:
            params = [json.loads(line) for line in f]
        runs[key] = Run(read_log(log), params, "\n".join(result.outputs), tmp / "params")
        return runs[key]

    return run


@pytest.mark.parametrize(("zero_stage", "pp"), [(0, 1), (1, 1), (0, 2)])
def test_fp16_overflow_skips_then_trains(fp16_run: RunFn, zero_stage: int, pp: int) -> None:
    run = fp16_run(zero_stage, pp)
    records, params = run.records, run.params
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    assert [p["iteration"] for p in params] == list(range(1, ITERS + 1))
    assert params[0]["dtypes"] == ["torch.float16"], "the model does not run in fp16"
    if zero_stage == 0 and pp == 1:  # with PP the last stage decides, and only rank 0 logs INFO
        assert TRAINER_SCALES in run.output, "the trainer did not apply the loss scale"

    skipped = [r["skipped_steps"] for r in records]
    scales = [r["loss_scale"] for r in records]
    assert skipped[0] == 1, "2**20 should overflow on the first step"
    assert 0 < skipped[-1] < ITERS - 4, skipped  # some skips, then enough applied updates
    prev_skipped, prev_scale = 0, 2.0**INITIAL_SCALE_POWER
    prev_digest = None
    for rec, par in zip(records, params, strict=True):
        step = rec["step"]
        did_skip = rec["skipped_steps"] - prev_skipped
        assert did_skip in (0, 1), (step, skipped)
        if did_skip:
            assert rec["loss_scale"] == prev_scale / 2, (step, scales)
            assert rec["grad_norm"] is None, step  # no norm for a skipped step
            if prev_digest is not None:
                assert par["digest"] == prev_digest, f"parameters changed on skipped step {step}"
            assert par["clip_divisor"] is None, step
        else:
            assert rec["loss_scale"] == prev_scale, (step, scales)  # no growth within 1000 steps
            assert par["digest"] != prev_digest, f"parameters unchanged on applied step {step}"
            assert rec["grad_norm"] is not None and math.isfinite(rec["grad_norm"]), step
            if zero_stage == 0:
                # DeepSpeed unscaled and clipped (gradient_clipping 1.0) by the logged norm, which
                # matches ZeRO 1 and PP 1 (test_fp16_stage0_updates_match_stage1)
                expected = prev_scale * max(1.0, rec["grad_norm"] + 1e-6)
                assert math.isclose(par["clip_divisor"], expected, rel_tol=1e-6), (step, par)
        prev_skipped, prev_scale, prev_digest = (
            rec["skipped_steps"],
            rec["loss_scale"],
            par["digest"],
        )
    # the LR schedule advances only on applied updates (warmup, then cosine: it always moves)
    lrs = [r["lr"] for r in records]
    for k in range(ITERS - 1):
        applied = skipped[k] == (skipped[k - 1] if k else 0)
        assert (lrs[k + 1] != lrs[k]) == applied, (k + 1, lrs, skipped)
    first_applied = next(k for k in range(ITERS) if skipped[k] == (skipped[k - 1] if k else 0))

    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[first_applied] - 0.1, losses


def _assert_same_training(a: Run, b: Run, loss_tol: float, norm_tol: float) -> None:
    for key in ("skipped_steps", "loss_scale"):
        assert [r[key] for r in a.records] == [r[key] for r in b.records], key
    for ra, rb in zip(a.records, b.records, strict=True):
        assert math.isclose(ra["loss"], rb["loss"], rel_tol=loss_tol), (ra, rb)
        if rb["grad_norm"] is None:
            assert ra["grad_norm"] is None, ra
        else:
            assert math.isclose(ra["grad_norm"], rb["grad_norm"], rel_tol=norm_tol), (ra, rb)


@pytest.mark.parametrize("fused", [False, True], ids=["FP16_UnfusedOptimizer", "FP16_Optimizer"])
def test_fp16_stage0_updates_match_stage1(fp16_run: RunFn, fused: bool) -> None:
    """The same steps skipped at the same scales, the same losses and gradient norms, and
    parameter updates equal to ZeRO 1's to fp16 rounding: not divided by the loss scale (2**17
    here), and not shrunk by DeepSpeed's zero-gradient Adam step at stage 0 (about 0.74 on the
    first update). PP 2 at stage 0 trains like PP 1 (its parameters are laid out differently)."""
    stage0, stage1 = fp16_run(0, fused=fused), fp16_run(1)
    # measured: losses within 2.5e-6 and norms within 2.7e-5 relative; the phantom Adam step alone
    # moves the loss after the first update by 2.4e-3
    _assert_same_training(stage0, stage1, loss_tol=1e-4, norm_tol=1e-4)
    initial = stage1.weights(0)
    assert stage0.weights(0).keys() == initial.keys()
    for name, w in stage0.weights(0).items():
        assert torch.equal(w, initial[name]), f"{name}: different initial weights"
    first_update = 1 + next(k for k, r in enumerate(stage1.records) if r["grad_norm"] is not None)
    for k in range(first_update, ITERS + 1):
        w0, w1 = stage0.weights(k), stage1.weights(k)
        flat0 = torch.cat([(w0[n] - w).flatten() for n, w in initial.items()])
        flat1 = torch.cat([(w1[n] - w).flatten() for n, w in initial.items()])
        # measured: 0 after the first update, 2.6e-4 after the last
        rel = float((flat0 - flat1).norm() / flat1.norm())
        assert rel < 2e-3, f"iteration {k}: the updates since the start differ by {rel:.3g}"
        for name, w in initial.items():
            ratio = float((w0[name] - w).norm() / (w1[name] - w).norm())
            assert 0.99 < ratio < 1.01, f"iteration {k}, {name}: update norm ratio {ratio:.4g}"
            if k == first_update:  # within one fp16 unit in the last place (measured: equal)
                ulp = w1[name].abs().clamp(min=2.0**-14) * 2.0**-10
                assert ((w0[name] - w1[name]).abs() <= ulp).all(), f"{name}: first update"
    if not fused:
        # PP 2 at stage 0 (measured: the same losses, norms within 1e-15 of PP 1; clipping by
        # DeepSpeed's own norm, which counts the tied embedding twice, moved norms by 1.1e-3)
        _assert_same_training(fp16_run(0, pp=2), stage0, loss_tol=1e-5, norm_tol=1e-4)


def test_fp16_stage0_not_scaled_twice(fp16_run: RunFn) -> None:
    """With DeepSpeed's backward applying the loss scale itself (upstream pull request 8393), the
    trainer does not scale again: the run is the same as the one where the trainer scales."""
    ours, fixed = fp16_run(0), fp16_run(0, deepspeed_scales=True)
    assert DEEPSPEED_SCALES in fixed.output and TRAINER_SCALES not in fixed.output
    assert [p["digest"] for p in fixed.params] == [p["digest"] for p in ours.params]
    for key in ("skipped_steps", "loss_scale", "loss", "grad_norm"):
        assert [r[key] for r in fixed.records] == [r[key] for r in ours.records], key
