"""bf16 at ZeRO stage 0 without pipeline parallelism: DeepSpeed wraps the optimizer in its fp16
optimizer (``FP16_UnfusedOptimizer`` on a CPU, ``FP16_Optimizer`` with FusedAdam) with a bf16
low-precision type, and inherits two of its fp16 problems (megatron_glm/training/engine.py):

- the wrapper primes Adam with one step on zero gradients; the trainer undoes it, so after N
  iterations Adam has taken N steps (bias correction and weight decay as at ZeRO 1/2 and in fp32).
  Measured without the undo: 4 steps after 3. The count is read from the checkpoint's layout-free
  state (``layout_free/state.json``, megatron_glm/training/reshard.py), which records the
  optimizer's own ``step``;
- the unfused wrapper computes the gradient norm it clips by (and reports) without knowing which
  parameters are TP partitions; the trainer hands it the TP-aware norm. Measured without it: 2.133
  at TP 2 where TP 1 has 2.318; with it the two agree within bf16 noise (2.3e-4 relative).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_glm.training.checkpointing import find_latest_checkpoint
from megatron_glm.training.reshard import LAYOUT_FREE_DIR, STATE_FILE
from tests.training.helpers import Corpus, launch, pretrain_args, read_log, write_ds_config

ITERS = 3
NORM_RTOL = 2e-3


def _run(corpus: Corpus, tmp: Path, tp: int, extra: list[str]) -> tuple[list[dict[str, Any]], str]:
    ds = write_ds_config(tmp / f"ds_tp{tp}.json", train_batch=4, micro=4, bf16=True)
    log = tmp / f"tp{tp}.jsonl"
    flags = ["--hidden-dropout", "0", "--attention-dropout", "0"]
    flags += ["--tensor-model-parallel-size", str(tp), *extra]
    args = pretrain_args(corpus, ds, log, iters=ITERS, bert_prob=1.0, extra=flags)
    result = launch(tp, args, log_dir=tmp / f"logs_tp{tp}")
    assert result.ok, result.describe()
    records = read_log(log)
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    return records, result.outputs[0]


def test_bf16_at_zero0_counts_adam_steps_and_clips_by_the_tp_norm(
    glm_corpus: Corpus, tmp_path: Path
) -> None:
    save = tmp_path / "ckpt"
    tp1, output = _run(glm_corpus, tmp_path, 1, ["--save", str(save)])
    # the optimizer DeepSpeed chose: its stage-0 fp16 wrapper, not its BF16_Optimizer
    assert "optimizer AdamW in DeepSpeed's FP16_UnfusedOptimizer" in output
    ref = find_latest_checkpoint(save)
    assert ref is not None and ref.iteration == ITERS
    state = json.loads((ref.path / LAYOUT_FREE_DIR / STATE_FILE).read_text())
    assert state["layout"]["precision"] == "bf16" and state["layout"]["zero_stage"] == 0
    assert state["optimizer"]["step"] == ITERS, state["optimizer"]

    tp2, _ = _run(glm_corpus, tmp_path, 2, [])
    for a, b in zip(tp1, tp2, strict=True):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=NORM_RTOL), (a, b)
