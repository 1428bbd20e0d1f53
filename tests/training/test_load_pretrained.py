"""Starting a run from weights (``--load-pretrained``) and what ``--load`` refuses, through real
``pretrain_glm.py`` runs on the tiny model (docs/checkpoints.md#loading-weights-and-resuming).

The source is a run of ours at TP 2 (3 iterations, dropout off). Its final parameters, recorded
by a hook in the source run itself, are the reference: every run started from its checkpoint (in
our form, or converted to the official GLM layout at TP 2 and to the consolidated form) must see
exactly those weights in its first forward (the same hook records the parameters before the
first iteration), at TP 1, with ZeRO 1 or 3 over two data-parallel ranks, and with two pipeline
stages; and all of them see the same first batch, so their first losses agree (ZeRO 3 partitions
the parameters at ``deepspeed.initialize``, so there the loss is the check). The optimizer, the LR
schedule (warmup starts over) and the data position (consumed samples) are fresh. Relaunching
the same command resumes from ``--save`` instead of loading the weights again.

``--load`` on a directory that holds something but no complete checkpoint of ours (an official
checkpoint, only incomplete saves, anything else) and ``--load-pretrained`` with a missing path or
another architecture are errors reported before any process group starts (exit 2).

``--no-load-optim``: resuming without the optimizer state must keep the loaded weights at ZeRO 0
with bf16, where DeepSpeed keeps fp32 master weights it does not refresh on its own.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from megatron_glm.config import GLMConfig
from megatron_glm.conversion.canonical import CanonicalCheckpoint, merge_shards
from megatron_glm.training.arguments import ConfigError, parse_run_config
from megatron_glm.training.checkpointing import META_FILE, find_latest_checkpoint
from megatron_glm.training.pipeline import module_canonical_name
from tests.training.helpers import (
    Corpus,
    LaunchResult,
    launch,
    pretrain_args,
    read_log,
    write_ds_config,
)

HOOK = "tests.training.fp16_hooks:record_params"
SOURCE_ITERS = 3
NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0"]
# warmup over 2 iterations: the first update of a fresh schedule uses half the peak LR
WARMUP = ["--lr-warmup-iters", "2"]
PEAK_LR = 1e-3
LOSS_RTOL = 1e-5  # same weights and batch, another layout: fp32 reduction order only
# every run uses micro-batches of 2 samples: the blank-infilling objective is drawn per
# micro-batch, so another micro-batch size would make another first batch
MICRO = 2


def _args(corpus: Corpus, ds: Path, log: Path, iters: int, *extra: str) -> list[str]:
    return pretrain_args(
        corpus, ds, log, iters=iters, bert_prob=0.5, extra=[*NO_DROPOUT, *WARMUP, *extra]
    )


def _launch(
    world_size: int, args: list[str], tmp: Path, params: Path | None = None
) -> LaunchResult:
    env = {"MEGATRON_GLM_HOOKS": HOOK, "FP16_PARAM_LOG": str(params)} if params else None
    return launch(world_size, args, log_dir=tmp, env=env)


def _run(world_size: int, args: list[str], tmp: Path, params: Path | None = None) -> str:
    result = _launch(world_size, args, tmp, params)
    assert result.ok, result.describe()
    return result.outputs[0]


def _recorded(params: Path, rank: int, iteration: int) -> dict[str, torch.Tensor]:
    """Parameters rank ``rank`` held before its ``iteration``-th update of one launch (0: before
    the first), as the hook saved them."""
    return load_file(f"{params}.rank{rank}.iter{iteration}.safetensors")


def _losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(log)}


@dataclass
class Source:
    """The TP 2 run every test starts from."""

    ckpt: Path  # our checkpoints (the run's --save)
    config: GLMConfig
    final: dict[str, torch.Tensor]  # canonical weights after the last iteration (= checkpoint)
    records: list[dict[str, Any]]  # its --log-json train records
    official: Path  # the same weights in the official GLM layout at TP 2
    consolidated: Path  # and in the consolidated form
    corpus: Corpus
    ds: Path  # DeepSpeed JSON: fp32, ZeRO 0, 4 samples per iteration in micro-batches of 2


@pytest.fixture(scope="module")
def source(glm_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Source:
    from megatron_glm.conversion.consolidated import FORM as CONSOLIDATED
    from megatron_glm.conversion.official import FORM as OFFICIAL

    tmp = tmp_path_factory.mktemp("pretrained_source")
    ds = write_ds_config(tmp / "ds.json", train_batch=4, micro=MICRO, lr=PEAK_LR)
    ckpt, log, params = tmp / "ckpt", tmp / "log.jsonl", tmp / "params"
    tp2 = ["--tensor-model-parallel-size", "2", "--save", str(ckpt)]
    _run(2, _args(glm_corpus, ds, log, SOURCE_ITERS, *tp2), tmp, params)
    ref = find_latest_checkpoint(ckpt)
    assert ref is not None and ref.iteration == SOURCE_ITERS
    meta = json.loads((ref.path / META_FILE).read_text())
    config = GLMConfig(**meta["config"]["model"])
    shards = [_recorded(params, rank, SOURCE_ITERS) for rank in range(2)]
    final = merge_shards(shards, config, "the source run's parameters")
    weights = CanonicalCheckpoint(config, dict(final), iteration=SOURCE_ITERS)
    official, consolidated = tmp / "official", tmp / "consolidated"
    OFFICIAL.write(weights, official, tensor_parallel=2, tag=str(SOURCE_ITERS))
    CONSOLIDATED.write(weights, consolidated)
    return Source(ckpt, config, final, read_log(log), official, consolidated, glm_corpus, ds)


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"parameters that differ from the source weights: {differ}"


# ---- continued pretraining at TP 1, and the relaunch that resumes -----------------------------
@dataclass
class Continued:
    records: list[dict[str, Any]]
    first_output: str
    second_output: str
    initial: dict[str, torch.Tensor]  # parameters before the first iteration


@pytest.fixture(scope="module")
def continued(source: Source, tmp_path_factory: pytest.TempPathFactory) -> Continued:
    """TP 1, one process, from our TP 2 checkpoint; ``--save``/``--load`` an empty directory
    that also receives the log; 4 iterations in two launches of the same command."""
    tmp = tmp_path_factory.mktemp("continued")
    out = tmp / "run"
    out.mkdir()  # exists and is empty: a fresh start
    log, params = out / "log.jsonl", tmp / "params"
    command = _args(
        source.corpus,
        source.ds,
        log,
        4,
        *("--save", str(out), "--load", str(out), "--load-pretrained", str(source.ckpt)),
        *("--exit-interval", "2"),
    )
    first = _run(1, command, tmp, params)
    initial = _recorded(params, 0, 0)
    second = _run(1, command, tmp)
    return Continued(read_log(log), first, second, initial)


def test_continued_pretraining_starts_from_the_weights_only(
    source: Source, continued: Continued
) -> None:
    _assert_same_weights(continued.initial, source.final)
    first = continued.records[0]
    assert first["step"] == 1
    assert first["consumed_samples"] == 4  # the data position starts at 0
    assert first["lr"] == pytest.approx(PEAK_LR / 2)  # the warmup starts over
    assert source.records[0]["lr"] == pytest.approx(PEAK_LR / 2)
    # the same first batch as the source run's first iteration, seen by the trained weights
    assert first["loss"] < source.records[0]["loss"]
    assert "model initialised from --load-pretrained" in continued.first_output
    assert f"{source.ckpt}: deepspeed form, iteration {SOURCE_ITERS}" in continued.first_output


def test_relaunch_resumes_instead_of_loading_again(continued: Continued) -> None:
    assert [r["step"] for r in continued.records] == [1, 2, 3, 4]
    assert continued.records[2]["consumed_samples"] == 12
    assert "resuming it; --load-pretrained" in continued.second_output
    assert "model initialised from --load-pretrained" not in continued.second_output


# ---- other layouts and forms ------------------------------------------------------------------
LAYOUTS = {
    # name: (flags, ZeRO stage, form of the weights); two processes each
    "zero1_dp2_official_tp2": ([], 1, "official"),
    "zero3_dp2_consolidated": ([], 3, "consolidated"),
    "pp2_zero1": (["--pipeline-model-parallel-size", "2"], 1, "deepspeed"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_start_from_the_same_weights(
    layout: str, source: Source, continued: Continued, tmp_path: Path
) -> None:
    flags, zero_stage, form = LAYOUTS[layout]
    world_size = 2
    path = {
        "official": source.official,
        "consolidated": source.consolidated,
        "deepspeed": source.ckpt,
    }[form]
    ds = write_ds_config(
        tmp_path / "ds.json", train_batch=4, micro=MICRO, zero_stage=zero_stage, lr=PEAK_LR
    )
    log, params = tmp_path / "log.jsonl", tmp_path / "params"
    args = _args(source.corpus, ds, log, 1, *flags, "--load-pretrained", str(path))
    output = _run(world_size, args, tmp_path, params)
    assert f"{form} form" in output
    (record,) = read_log(log)
    assert (record["step"], record["consumed_samples"]) == (1, 4)
    assert record["lr"] == pytest.approx(PEAK_LR / 2)
    if zero_stage != 3:  # ZeRO 3: the module holds empty placeholders; the loss is the check
        _assert_recorded_weights(
            params, world_size, "--pipeline-model-parallel-size" in flags, source
        )
    assert record["loss"] == pytest.approx(continued.records[0]["loss"], rel=LOSS_RTOL)


def _assert_recorded_weights(
    params: Path, world_size: int, pipelined: bool, source: Source
) -> None:
    if pipelined:
        n = source.config.num_layers
        seen: dict[str, torch.Tensor] = {}
        for rank in range(world_size):
            for name, tensor in _recorded(params, rank, 0).items():
                name = module_canonical_name(name, n)
                if name in seen:  # the tied word table: first and last stage hold it
                    assert torch.equal(seen[name], tensor), name
                seen[name] = tensor
        _assert_same_weights(seen, source.final)
    else:
        for rank in range(world_size):
            _assert_same_weights(_recorded(params, rank, 0), source.final)


# ---- what --load and --load-pretrained refuse -------------------------------------------------
def _validate(source: Source, *flags: str) -> ConfigError:
    args = [
        *pretrain_args(source.corpus, source.ds, Path("unused.jsonl"), iters=2, bert_prob=0.5),
        *flags,
    ]
    with pytest.raises(ConfigError) as caught:
        parse_run_config(args, world_size=1)
    return caught.value


def test_load_on_an_official_checkpoint_exits_2(source: Source, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    args = _args(source.corpus, source.ds, log, 2, "--load", str(source.official))
    result = _launch(1, args, tmp_path)
    assert result.returncodes == [2], result.describe()
    message = result.outputs[0]
    assert "official GLM form" in message and "nothing to resume" in message
    assert f"--load-pretrained {source.official}" in message
    assert "tools/convert_checkpoint.py" in message
    assert "process group" not in message and not log.exists()


def test_load_on_incomplete_saves_only_is_an_error(source: Source, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ref = find_latest_checkpoint(source.ckpt)
    assert ref is not None
    shutil.copytree(ref.path, ckpt / "5", ignore=shutil.ignore_patterns("COMPLETE"))
    (ckpt / "7").mkdir()
    err = _validate(source, "--load", str(ckpt))
    message = str(err)
    assert "only incomplete checkpoints" in message and "5, 7" in message
    assert f"rm -r {ckpt / '5'} {ckpt / '7'}" in message


def test_load_on_other_content_is_an_error(source: Source, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("weights are elsewhere\n")
    message = str(_validate(source, "--load", str(tmp_path)))
    assert "holds no complete megatron_glm checkpoint (found: notes.txt)" in message


def test_load_on_missing_or_empty_directory_starts_fresh(source: Source, tmp_path: Path) -> None:
    base = pretrain_args(source.corpus, source.ds, tmp_path / "log.jsonl", iters=2, bert_prob=0.5)
    (tmp_path / "empty").mkdir()
    for load in (tmp_path / "missing", tmp_path / "empty"):
        run = parse_run_config([*base, "--load", str(load)], world_size=1)
        assert run.training.load == str(load)
    # the run's own log and TensorBoard directory do not count as content
    (tmp_path / "empty").rmdir()
    (tmp_path / "tb").mkdir()
    (tmp_path / "log.jsonl").write_text("")
    own = ["--tensorboard-dir", str(tmp_path / "tb"), "--load", str(tmp_path)]
    parse_run_config([*base, *own], world_size=1)


OTHER_ARCHITECTURE = ["--num-layers", "3", "--hidden-size", "48", "--num-attention-heads", "4"]


@pytest.mark.parametrize("form", ["deepspeed", "consolidated"])
def test_pretrained_of_another_architecture_is_an_error(source: Source, form: str) -> None:
    path = source.ckpt if form == "deepspeed" else source.consolidated
    err = _validate(source, "--load-pretrained", str(path), *OTHER_ARCHITECTURE)
    problems = "\n".join(err.problems)
    assert f"({form} form) does not fit this run's model" in problems
    for field, theirs, ours in [("num_layers", 2, 3), ("hidden_size", 32, 48)]:
        assert f"{field} is {theirs}, the given model config says {ours}" in problems
    assert "ffn_hidden_size is 128, the given model config says 192" in problems


def test_official_weights_of_another_architecture_stop_before_training(
    source: Source, tmp_path: Path
) -> None:
    """The official layout declares no architecture: its tensor shapes are checked when rank 0
    reads it, before DeepSpeed starts, and every rank stops."""
    log = tmp_path / "log.jsonl"
    args = _args(source.corpus, source.ds, log, 2, "--load-pretrained", str(source.official))
    result = _launch(2, [*args, *OTHER_ARCHITECTURE, "--tensor-model-parallel-size", "2"], tmp_path)
    assert result.returncodes == [2, 2], result.describe()  # a user error, like the flags'
    output = result.outputs[0]  # rank 0 says it once
    assert "the given model config does not fit the checkpoint" in output
    assert "num_layers: the given model config says 3, the checkpoint has 2" in output
    assert not log.exists() or not read_log(log)


def test_missing_pretrained_path_is_an_error(source: Source, tmp_path: Path) -> None:
    err = _validate(source, "--load-pretrained", str(tmp_path / "nowhere"))
    assert err.problems == [f"--load-pretrained {tmp_path / 'nowhere'} does not exist"]


def test_pretrained_into_a_save_directory_with_checkpoints_needs_load(source: Source) -> None:
    err = _validate(source, "--load-pretrained", str(source.official), "--save", str(source.ckpt))
    assert f"pass --load {source.ckpt} to resume it" in "\n".join(err.problems)


def test_a_checkpoint_to_resume_wins_over_pretrained(source: Source, tmp_path: Path) -> None:
    # resuming never looks at --load-pretrained, even a path that no longer exists
    base = pretrain_args(source.corpus, source.ds, tmp_path / "log.jsonl", iters=5, bert_prob=0.5)
    flags = ["--tensor-model-parallel-size", "2", "--load", str(source.ckpt)]
    run = parse_run_config(
        [*base, *flags, "--load-pretrained", str(tmp_path / "gone")], world_size=2
    )
    assert run.training.load_pretrained == str(tmp_path / "gone")


# ---- --no-load-optim --------------------------------------------------------------------------
def test_no_load_optim_keeps_the_loaded_weights_at_zero0_bf16(
    glm_corpus: Corpus, tmp_path: Path
) -> None:
    """Resume without the optimizer state and with a fresh schedule whose first LR is tiny: the
    first update must leave the weights at the loaded ones. Were the fp32 master weights not
    refreshed from them, that update would write the initial weights back."""
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4, bf16=True, lr=1e-2)
    ckpt, params = tmp_path / "ckpt", tmp_path / "params"
    first = _args(glm_corpus, ds, tmp_path / "a.jsonl", 3, "--save", str(ckpt))
    _run(1, first, tmp_path, params)
    initial, loaded = _recorded(params, 0, 0), _recorded(params, 0, 3)
    resumed = tmp_path / "resumed"
    second = pretrain_args(
        glm_corpus,
        ds,
        tmp_path / "b.jsonl",
        iters=4,
        bert_prob=0.5,
        extra=[
            *NO_DROPOUT,
            *("--load", str(ckpt), "--no-load-optim", "--no-load-lr-scheduler"),
            *("--lr-warmup-iters", "1000"),
        ],
    )
    _run(1, second, tmp_path, resumed)
    (record,) = read_log(tmp_path / "b.jsonl")
    # --no-load-lr-scheduler: the new schedule starts at its first warmup step
    assert (record["step"], record["lr"]) == (4, pytest.approx(1e-2 / 1000))
    _assert_same_weights(_recorded(resumed, 0, 0), loaded)
    after = _recorded(resumed, 0, 1)
    moved = max(float((after[n] - loaded[n]).abs().max()) for n in loaded)
    trained = max(float((loaded[n] - initial[n]).abs().max()) for n in loaded)
    assert moved < 0.1 * trained, (moved, trained)
