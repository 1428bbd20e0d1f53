"""Official GLM and Megatron flags: each with its meaning and its program's defaults
(megatron_glm/training/compat.py, docs/compatibility.md). Parser-level: no data is read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_glm.config.data import parse_data_path
from megatron_glm.training import arguments
from megatron_glm.training.arguments import ConfigError, RunConfig, build_parser, build_run_config
from megatron_glm.training.summary import describe_run
from tests.training.helpers import write_ds_config

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4"]
MODEL += ["--vocab-size", "512", "--seq-length", "64", "--max-position-embeddings", "64"]
DATA = ["--data-path", "unused_prefix"]


def run_config(*argv: str, world_size: int = 1, cuda: bool = True) -> RunConfig:
    args = build_parser().parse_args([*MODEL, *DATA, *argv])
    return build_run_config(args, world_size, cuda=cuda, check_data=False)


def problems_of(*argv: str, world_size: int = 1, cuda: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as err:
        run_config(*argv, world_size=world_size, cuda=cuda)
    return err.value.problems


@pytest.fixture
def ds_json(tmp_path: Path) -> Path:
    return write_ds_config(tmp_path / "ds.json", train_batch=8, micro=2, lr=1e-3)


def test_defaults_follow_the_dialect(ds_json: Path) -> None:
    ours = run_config("--train-iters", "100", "--deepspeed_config", str(ds_json))
    official = run_config("--train-iters", "100", "--deepspeed_config", str(ds_json), "--block-lm")
    megatron = run_config("--train-iters", "100", "--micro-batch-size", "2", "--lr", "1e-3")
    assert (ours.dialect, official.dialect, megatron.dialect) == ("ours", "official", "megatron")
    t = ours.training
    assert (t.lr_decay_style, t.lr_decay_ratio, t.warmup, t.eval_interval) == (
        "cosine",
        0.1,
        0.01,
        None,
    )
    assert (t.eval_iters, t.log_interval) == (10, 10)
    t = official.training  # THUDM/GLM arguments.py defaults
    assert (t.lr_decay_style, t.lr_decay_ratio, t.warmup) == ("linear", 0.1, 0.01)
    assert (t.eval_interval, t.eval_iters, t.log_interval) == (1000, 100, 100)
    assert t.save_interval is None  # 5000 only applies with --save
    t = megatron.training  # Megatron: linear decay to --min-lr 0, no warmup
    assert (t.lr_decay_style, t.final_lr_ratio(1e-3), t.warmup_iters) == ("linear", 0.0, 0)
    assert any("official command line" in n for n in official.notes)
    explicit = run_config(
        "--train-iters", "10", "--deepspeed_config", str(ds_json), "--block-lm",
        "--lr-decay-style", "cosine", "--eval-interval", "5",
    )  # fmt: skip
    assert (explicit.training.lr_decay_style, explicit.training.eval_interval) == ("cosine", 5)


def test_official_layout_and_checkpoint_flags(ds_json: Path, tmp_path: Path) -> None:
    base = ["--train-iters", "10", "--deepspeed_config", str(ds_json), "--block-lm"]
    run = run_config(*base, "--model-parallel-size", "2", world_size=2)
    assert run.training.tensor_model_parallel_size == 2 and run.data_parallel_size == 1
    save = str(tmp_path / "ckpt")
    run = run_config(*base, "--save", save, "--experiment-name", "blocklm-blank")
    assert run.training.save == f"{save}/blocklm-blank"
    assert run.training.save_interval == 5000  # the official default, with --save
    # with --load, the official code continues in SAVE/basename(LOAD)
    run = run_config(*base, "--save", save, "--experiment-name", "x", "--load", "/cache/run-7/")
    assert run.training.save == f"{save}/run-7" and run.training.load == "/cache/run-7/"
    run = run_config(
        *base, "--save", save, "--experiment-name", "x", "--load", "/c/r", "--new-save-directory"
    )
    assert run.training.save == f"{save}/x"
    run = run_config(*base, "--no-load-optim", "--no-load-lr-scheduler", "--no-load-rng")
    assert not (run.training.load_optim or run.training.load_lr_scheduler or run.training.load_rng)
    assert run_config(*base).training.load_optim
    problems = problems_of(
        *base, "--model-parallel-size", "2", "--tensor-model-parallel-size", "4", world_size=8
    )
    assert any("--model-parallel-size 2 and --tensor-model-parallel-size 4" in p for p in problems)
    assert any(
        "--experiment-name needs --save" in p for p in problems_of(*base, "--experiment-name", "x")
    )


def test_official_flags_without_effect_are_named_once(
    ds_json: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_config(
        "--train-iters", "10", "--deepspeed_config", str(ds_json), "--block-lm",
        "--resume-dataloader", "--lazy-loader", "--loader-scatter", "32", "--shuffle",
        "--no-lazy-loader", "--checkpoint-activations", "--deepspeed-activation-checkpointing",
        "--distributed-backend", "nccl",
    )  # fmt: skip
    noop = [n for n in run.notes if "accepted without effect" in n]
    assert len(noop) == 1
    for flag in ("--lazy-loader", "--loader-scatter", "--shuffle", "--resume-dataloader"):
        assert flag in noop[0]
    assert run.model.checkpoint_activations
    # nccl is honoured with CUDA
    assert run.training.distributed_backend == "nccl"
    # --fp16 fills the JSON's precision; a CPU without native fp16 refuses it
    monkeypatch.setattr(arguments, "_cpu_fp16_supported", lambda: False)
    cpu = problems_of(
        "--train-iters", "10", "--deepspeed_config", str(ds_json), "--fp16", cuda=False
    )  # fmt: skip
    assert any("fp16 needs a CUDA device" in p for p in cpu)


def test_nccl_without_cuda_runs_on_gloo_with_a_note(ds_json: Path) -> None:
    run = run_config(
        "--train-iters", "10", "--deepspeed_config", str(ds_json),
        "--distributed-backend", "nccl", cuda=False,
    )  # fmt: skip
    assert run.training.distributed_backend == "gloo"
    assert any("nccl needs CUDA" in n for n in run.notes)


def test_official_flags_that_cannot_be_honoured(ds_json: Path) -> None:
    problems = problems_of(
        "--train-iters", "10", "--deepspeed_config", str(ds_json), "--block-lm",
        "--train-data", "pile", "cc-news", "--filter-english", "--deepspeed-activation-checkpointing",
    )  # fmt: skip
    assert any("--train-data" in p and "--data-path PREFIX" in p for p in problems)
    assert any("--filter-english" in p and "before tools/preprocess_data.py" in p for p in problems)
    assert any("needs --checkpoint-activations" in p for p in problems)


def test_megatron_flags_build_the_deepspeed_json() -> None:
    run = run_config(
        "--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "3e-4",
        "--min-lr", "3e-5", "--train-samples", "1000", "--lr-warmup-iters", "7",
        "--weight-decay", "0.1", "--clip-grad", "0.5", "--adam-beta2", "0.95",
        "--adam-eps", "1e-6", "--bf16", "--use-distributed-optimizer",
        "--recompute-activations", "--use-flash-attn", world_size=4,
    )  # fmt: skip
    ds, t = run.ds, run.training
    assert (ds.train_batch_size, ds.micro_batch_size, ds.gradient_accumulation_steps) == (16, 2, 2)
    assert t.train_iters == 63  # ceil(1000 / 16)
    assert t.warmup_iters == 7 and t.final_lr_ratio(ds.peak_lr) == pytest.approx(0.1)
    assert (ds.precision, ds.zero_stage, ds.gradient_clipping, ds.weight_decay) == (
        "bf16",
        1,
        0.5,
        0.1,
    )
    params = ds.config["optimizer"]["params"]
    assert ds.config["optimizer"]["type"] == "AdamW"
    assert (params["betas"], params["eps"], params["lr"]) == ([0.9, 0.95], 1e-6, 3e-4)
    assert run.model.checkpoint_activations and run.model.attention_backend == "auto"
    assert any("selective" in n for n in run.notes)
    run = run_config("--micro-batch-size", "4", "--lr", "1e-3", "--train-iters", "5", "--fp16")
    assert run.ds.config["fp16"]["initial_scale_power"] == 32 and run.ds.zero_stage == 0
    assert run.ds.config["gradient_clipping"] == 1.0  # Megatron's --clip-grad default
    assert run.ds.config["optimizer"]["params"]["weight_decay"] == 0.01  # and --weight-decay's
    # fraction of the decay iterations, like the official --warmup
    run = run_config("--micro-batch-size", "4", "--lr", "1e-3", "--train-iters", "50",
                     "--lr-warmup-fraction", "0.1")  # fmt: skip
    assert run.training.warmup_iters == 5


def test_megatron_flags_checked_against_the_json(ds_json: Path) -> None:
    raw = json.loads(ds_json.read_text())
    assert "fp16" not in raw and raw["gradient_clipping"] == 1.0
    run = run_config(
        "--train-iters", "10", "--deepspeed_config", str(ds_json), "--micro-batch-size", "2",
        "--bf16", "--zero-stage", "0",
    )  # fmt: skip
    assert run.ds.precision == "bf16"  # filled in: the JSON leaves precision open
    problems = problems_of(
        "--train-iters", "10", "--deepspeed_config", str(ds_json), "--micro-batch-size", "4",
        "--global-batch-size", "32", "--weight-decay", "0.01", "--adam-beta1", "0.8",
        "--use-distributed-optimizer",
    )  # fmt: skip
    for needle in (
        "--micro-batch-size 4 contradicts train_micro_batch_size_per_gpu = 2",
        "--global-batch-size 32 contradicts train_batch_size = 8",
        "--weight-decay 0.01 contradicts optimizer.params.weight_decay = 0.1",
        "--adam-beta1 0.8 contradicts optimizer.params.betas = [0.9, 0.98]",
        "--use-distributed-optimizer (ZeRO stage 1) contradicts zero_optimization.stage = 0",
    ):
        assert any(needle in p and str(ds_json) in p for p in problems), (needle, problems)
    problems = problems_of(
        "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "5", "--train-samples", "9",
        "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3", "--fp16", "--bf16",
        "--use-flash-attn", "--attention-backend", "dense",
    )  # fmt: skip
    for needle in ("--train-iters or --train-samples", "--lr-warmup-fraction or --lr-warmup-iters",
                   "--fp16 and --bf16", "--use-flash-attn and --attention-backend dense"):  # fmt: skip
        assert any(needle in p for p in problems), (needle, problems)
    assert any("no batch size" in p for p in problems_of("--lr", "1e-3", "--train-iters", "5"))


def test_unweighted_data_paths_blend_by_size() -> None:
    assert parse_data_path(["a", "b", "c"]) == [(None, "a"), (None, "b"), (None, "c")]
    assert parse_data_path(["1", "a", "3", "b"]) == [(0.25, "a"), (0.75, "b")]
    with pytest.raises(ValueError, match="'weight prefix' pairs or prefixes alone"):
        parse_data_path(["0.5", "a", "b"])


def test_summary_lists_the_resolved_configuration(ds_json: Path) -> None:
    run = run_config("--train-iters", "10", "--deepspeed_config", str(ds_json), world_size=2)
    text = describe_run(run)
    assert "raw sample 64 tokens (--seq-length), model input 82 = raw + 2 x 9" in text
    assert "layout: world 2 = tensor 1 x pipeline 1 x data 2" in text
    assert "batch: 8 samples per iteration = micro 2 x accumulation 2 x data-parallel 2" in text
    assert "precision fp32, ZeRO stage 0" in text
    ds_line = text.split("DeepSpeed config: ", 1)[1]
    assert json.loads(ds_line)["train_batch_size"] == 8


def test_official_differences_are_printed(ds_json: Path) -> None:
    base = ["--train-iters", "10", "--deepspeed_config", str(ds_json)]
    official = run_config(*base, "--block-lm").notes
    assert any(n.startswith("deliberate differences from the official GLM code") for n in official)
    assert any("--loss-normalization micro-batch" in n for n in official)
    chosen = run_config(*base, "--block-lm", "--loss-normalization", "micro-batch").notes
    assert not any("--loss-normalization micro-batch" in n for n in chosen)
    assert not run_config(*base).notes  # our own dialect: nothing to explain


def test_config_imports_without_torch_or_the_data_package() -> None:
    """Tools validate configurations cheaply: megatron_glm.config pulls in neither."""
    code = (
        "import sys, megatron_glm.config.data, megatron_glm.config.training; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('megatron_glm.data')]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
