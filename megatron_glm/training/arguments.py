"""Megatron-style command line -> validated ``RunConfig``, before any process-group work.

``parse_run_config(argv, world_size)`` parses the flags (model, layout, schedule, checkpoints,
logging; the data/tokenizer/blank-infilling flags come from ``megatron_glm.config.data``; the
DeepSpeed flags from ``deepspeed.add_config_arguments``), checks every combination and raises ONE
``ConfigError`` listing every problem found. docs/training.md is the flag reference.

Model size: ``--preset NAME`` (``megatron_glm.config.model.PRESETS``) fills the architecture;
explicit flags override it. Vocabulary: ``--vocab-size`` if given, else the tokenizer's size (plus
the ``[MASKi]``/``[sopi]`` pairs with ``--sentinel-token``), else the preset's; a tokenizer larger
than the model vocabulary is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_glm.config.data import DataConfig, add_data_args, plan_for_raw_length
from megatron_glm.config.model import ARCHITECTURE_FLAGS, ATTENTION_BACKENDS, PRESETS, GLMConfig
from megatron_glm.config.training import LOSS_NORMALIZATIONS, LR_DECAY_STYLES, TrainingConfig
from megatron_glm.data.tokenizers import GLMTokenizer
from megatron_glm.training.compat import (
    add_compat_args,
    apply_compat,
    ds_config_from_flags,
    merge_flags_into_ds_config,
    train_iters_from_samples,
)
from megatron_glm.training.ds_config import ResolvedDSConfig, load_ds_json, resolve_ds_config
from megatron_glm.training.guards import FailureConfig, add_failure_args, failure_config_from_args

logger = logging.getLogger(__name__)

# Tokens read from the start of each dataset to check that the ids fit the tokenizer (a cheap
# guard against data made with another tokenizer; the whole file would cost a full read).
_TOKEN_CHECK_LIMIT = 1 << 24

# Flags whose value overrides the preset, argparse name -> GLMConfig field.
_MODEL_FLAGS = {
    **ARCHITECTURE_FLAGS,
    "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "attention_backend": "attention_backend",
    "checkpoint_num_layers": "checkpoint_num_layers",
}


class ConfigError(ValueError):
    """Every problem of a command line, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) with the configuration:\n  - "
            + "\n  - ".join(self.problems)
        )


@dataclass
class RunConfig:
    """Everything one training launch needs, validated."""

    model: GLMConfig
    training: TrainingConfig
    data: DataConfig
    ds: ResolvedDSConfig
    world_size: int
    failure: FailureConfig = dataclasses.field(default_factory=FailureConfig)
    dialect: str = "ours"  # whose defaults filled the flags left out (training/compat.py)
    notes: list[str] = dataclasses.field(default_factory=list)  # printed once at start-up
    task: Any = None  # a finetuning run's megatron_glm.tasks.finetune.FinetuneConfig

    @property
    def data_parallel_size(self) -> int:
        return self.ds.data_parallel_size

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model.to_dict(),
            "training": self.training.to_dict(),
            "data": self.data.to_dict(),
            "deepspeed": self.ds.config,
            "world_size": self.world_size,
        }
        if self.task is not None:
            out["task"] = self.task.to_dict()
        return out


def build_parser(*, finetune: bool = False) -> argparse.ArgumentParser:
    """The flags of ``pretrain_glm.py``; with ``finetune`` also the task flags of
    ``finetune_glm.py`` (``megatron_glm.tasks.finetune``)."""
    p = argparse.ArgumentParser(
        prog="finetune_glm.py" if finetune else "pretrain_glm.py",
        description=(
            "Finetune GLM on a cloze or seq2seq task with DeepSpeed; see docs/finetuning.md."
            if finetune
            else "Pretrain GLM (autoregressive blank infilling) with DeepSpeed. "
            "Flags are Megatron's/the official GLM's; see docs/training.md."
        ),
    )
    if finetune:
        from megatron_glm.tasks.finetune import add_finetune_args

        add_finetune_args(p)
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model size preset; explicit model flags override it",
    )
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="default 4 * hidden size")
    g.add_argument(
        "--vocab-size",
        type=int,
        help="model vocabulary before padding (default: the tokenizer's size)",
    )
    g.add_argument(
        "--max-position-embeddings",
        type=int,
        help="largest position (default: the preset's, else --seq-length)",
    )
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--hidden-dropout", type=float)
    g.add_argument("--attention-dropout", type=float)
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS)
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="recompute each layer's activations in backward (RNG-tracked)",
    )
    g.add_argument("--checkpoint-num-layers", type=int)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default 1")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron sequence parallelism: split the LayerNorm/dropout/residual activations "
        "along the sequence over the TP ranks (less activation memory; at dropout 0 the same "
        "numbers as without); needs tensor-model-parallel-size > 1 and a model input length "
        "divisible by it (docs/parallelism.md#sequence-parallelism)",
    )

    g = p.add_argument_group("iterations and learning rate")
    g.add_argument("--train-iters", type=int, default=None, required=False)
    g.add_argument(
        "--exit-interval",
        type=int,
        default=None,
        help="save and stop at the next multiple of this iteration",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: optimizer.params.lr of the DeepSpeed JSON)",
    )
    g.add_argument("--min-lr", type=float, default=None, help="final LR (sets the decay ratio)")
    g.add_argument("--lr-decay-ratio", type=float, default=None, help="final LR / peak LR (0.1)")
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=None, help="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warmup length as a fraction of the decay iterations (0.01)",
    )
    g.add_argument(
        "--loss-normalization",
        choices=LOSS_NORMALIZATIONS,
        default="global",
        help="global: mean over all loss tokens of the global batch (docs/training.md); "
        "micro-batch: the official per-micro-batch mean",
    )

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument(
        "--load",
        default=None,
        help="resume from the newest complete checkpoint here; a missing or empty directory "
        "starts fresh, anything else (an official GLM checkpoint, only incomplete saves) is an "
        "error",
    )
    g.add_argument(
        "--load-pretrained",
        default=None,
        help="initialise the model from these weights: any checkpoint form (ours, consolidated, "
        "the official GLM's, Hugging Face), any source layout; optimizer, schedule and data "
        "position start fresh; ignored when --load finds a checkpoint to resume "
        "(docs/checkpoints.md)",
    )
    g.add_argument("--save-interval", type=int, default=None, help="default: save at the end")
    g.add_argument(
        "--no-layout-free-state",
        action="store_true",
        help="do not save the layout-free copy of the weights and optimizer state (12 bytes per "
        "parameter): the checkpoint then resumes only on the same TP/PP/DP/ZeRO layout",
    )
    g.add_argument("--keep-last-k", type=int, default=None, help="delete older checkpoints")
    g.add_argument(
        "--load-fallback",
        action="store_true",
        help="when the newest checkpoint under --load fails verification (a damaged or missing "
        "file), resume the newest older one that verifies instead of stopping (logged)",
    )
    g.add_argument(
        "--no-verify-checkpoint-hashes",
        action="store_true",
        help="resume without checking the SHA-256 of every checkpoint file against its manifest "
        "(sizes and everything else are still checked): for checkpoints too large to read twice",
    )
    g.add_argument(
        "--no-load-rng",
        action="store_true",
        help="resume without restoring the RNG streams (the run will not repeat bit "
        "for bit; for experiments and tests)",
    )

    g = p.add_argument_group("validation and logging")
    g.add_argument("--eval-interval", type=int, default=None, help="default: no validation")
    g.add_argument(
        "--eval-iters", type=int, default=None, help="global batches per validation (10)"
    )
    g.add_argument("--log-interval", type=int, default=None, help="default 10")
    g.add_argument("--log-json", default=None, help="append one JSON object per logged step")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-device peak TFLOP/s for the MFU estimate (default: known GPUs)",
    )
    # The deepspeed launcher passes --local_rank; torchrun exports LOCAL_RANK instead.
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    g.add_argument(
        "--dry-run",
        action="store_true",
        help="validate everything (flags, JSON, data, tokenizer, layout, splits), print the "
        "resolved configuration and exit 0, or 2 with every problem; starts no process group",
    )
    g.add_argument(
        "--dry-run-world-size",
        type=int,
        default=None,
        help="with --dry-run: check the layout for this many processes (default: the launcher's)",
    )

    add_failure_args(p)
    add_data_args(p)  # --data-path --split --seq-length --seed --tokenizer-* and the GLM knobs
    add_compat_args(p)  # the official GLM's and Megatron's flags
    import deepspeed  # deferred: importing deepspeed is slow and only the parser needs it here

    deepspeed.add_config_arguments(p)
    return p


def _model_config(
    args: argparse.Namespace, tokenizer_vocab: int | None, problems: list[str]
) -> GLMConfig | None:
    values: dict[str, Any] = dict(PRESETS[args.preset]) if args.preset else {}
    explicit = {
        field: getattr(args, flag)
        for flag, field in _MODEL_FLAGS.items()
        if getattr(args, flag) is not None
    }
    values.update(explicit)
    if args.checkpoint_activations:
        values["checkpoint_activations"] = True
    if args.sequence_parallel:
        values["sequence_parallel"] = True
    if "vocab_size" not in explicit and tokenizer_vocab is not None:
        values["vocab_size"] = tokenizer_vocab
    values.setdefault("max_sequence_length", args.seq_length)
    values["seed"] = args.seed
    missing = [
        f"--{flag.replace('_', '-')}"
        for flag in ("num_layers", "hidden_size", "num_attention_heads")
        if flag not in values
    ]
    if "vocab_size" not in values:
        missing.append("--vocab-size (or a tokenizer)")
    if missing:
        problems.append(f"model size not given: pass --preset or {', '.join(missing)}")
        return None
    try:
        return GLMConfig(**values)
    except (ValueError, TypeError) as err:
        problems.append(str(err))
        return None


def _check_layout(model: GLMConfig, tp: int, pp: int, world_size: int, problems: list[str]) -> None:
    if tp < 1 or pp < 1:
        return  # reported by TrainingConfig
    if model.num_attention_heads % tp:
        problems.append(
            f"tensor-model-parallel-size {tp} does not divide num-attention-heads "
            f"{model.num_attention_heads}"
        )
    if model.padded_vocab_size % tp:
        problems.append(
            f"tensor-model-parallel-size {tp} does not divide the padded vocabulary "
            f"{model.padded_vocab_size} (make --make-vocab-size-divisible-by a multiple of it)"
        )
    if model.ffn_hidden_size % tp:
        problems.append(
            f"tensor-model-parallel-size {tp} does not divide ffn-hidden-size "
            f"{model.ffn_hidden_size}"
        )
    if pp > model.num_layers:
        problems.append(
            f"pipeline-model-parallel-size {pp} is larger than num-layers "
            f"{model.num_layers}: every stage needs at least one layer"
        )
    if world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by tensor-model-parallel-size "
            f"{tp} * pipeline-model-parallel-size {pp} = {tp * pp}"
        )


def _configure_sequence_parallel(
    model: GLMConfig,
    data: DataConfig | None,
    ds: ResolvedDSConfig | None,
    tp: int,
    pp: int,
    problems: list[str],
    notes: list[str],
) -> None:
    """--sequence-parallel: the model input length must split over the TP ranks, and a pipeline
    must send each rank's own sequence slice between stages (set in ``ds.config``)."""
    if not model.sequence_parallel or tp < 1 or pp < 1:
        return
    if tp == 1:
        notes.append("--sequence-parallel has no effect at tensor-model-parallel-size 1")
        return
    if data is not None and data.input_length % tp:
        plan = data.shape_plan
        fitting = next(
            (
                f"; --seq-length {n} gives {length}"
                for n in range(plan.raw_length + 1, plan.raw_length + 64 * tp)
                if (length := plan_for_raw_length(n, data.infilling).input_length) % tp == 0
            ),
            "",
        )
        problems.append(
            f"--sequence-parallel splits the model input of {plan.input_length} tokens "
            f"(--seq-length {plan.raw_length} + 2 x {plan.max_spans} for the blanks) over "
            f"tensor-model-parallel-size {tp}, which does not divide it{fitting}"
        )
    if pp > 1 and ds is not None:
        # DeepSpeed's PipelineEngine by default sends 1/tp of a stage's output from each TP rank
        # and all-gathers it on arrival, taking the activation to be the same on every TP rank;
        # under sequence parallelism each rank holds a different slice, so send it whole.
        pipeline = ds.config.setdefault("pipeline", {})
        forced = [k for k in ("pipe_partitioned", "grad_partitioned") if pipeline.get(k)]
        if forced:
            problems.append(
                f"--sequence-parallel with pipeline-model-parallel-size {pp}: the DeepSpeed "
                f"config sets pipeline.{' and pipeline.'.join(forced)} true, which splits "
                "stage outputs over the TP ranks as if they were replicated; remove it"
            )
        pipeline.update(pipe_partitioned=False, grad_partitioned=False)


def _check_data(
    data: DataConfig,
    tokenizer: GLMTokenizer | None,
    needed_splits: tuple[str, ...],
    problems: list[str],
) -> None:
    """Data files, their token ids against the tokenizer, and the splits this run reads."""
    from megatron_glm.data.glm_dataset import check_splits
    from megatron_glm.data.indexed_dataset import IndexedDataset, best_dtype
    from megatron_glm.data.tokenizers import dataset_tokenizer_problem

    if not data.data_path:
        problems.append("--data-path is required")
        return
    if data.tokenizer_type is None:
        problems.append(
            "--tokenizer-type is required (the data's tokenizer: its command tokens "
            "drive blank infilling)"
        )
    try:
        weighted = data.weighted_paths
    except ValueError as err:
        problems.append(str(err))
        return
    tokenizer_vocab = None if tokenizer is None else tokenizer.vocab_size
    readable = True
    for _, prefix in weighted:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            problems.append(f"data prefix {prefix!r}: missing {', '.join(missing)}")
            readable = False
            continue
        try:
            ds = IndexedDataset(prefix)
        except (OSError, ValueError) as err:
            problems.append(f"data prefix {prefix!r}: {err}")
            readable = False
            continue
        if tokenizer_vocab is None:
            continue
        if ds.dtype.kind not in "iu" or np.iinfo(ds.dtype).max < tokenizer_vocab - 1:
            problems.append(
                f"data prefix {prefix!r} holds {ds.dtype} tokens, too narrow for the "
                f"tokenizer's {tokenizer_vocab} ids (expected "
                f"{np.dtype(best_dtype(tokenizer_vocab))})"
            )
            continue
        mismatch = dataset_tokenizer_problem(prefix, tokenizer)
        if mismatch is not None:
            problems.append(mismatch)
            continue
        head = ds._tokens[:_TOKEN_CHECK_LIMIT]  # noqa: SLF001 - read-only view of the .bin
        if head.size and int(head.max()) >= tokenizer_vocab:
            problems.append(
                f"data prefix {prefix!r} contains token id {int(head.max())}, outside "
                f"the tokenizer's vocabulary of {tokenizer_vocab}: the data was made "
                "with a different tokenizer"
            )
    if readable:
        eos_id = None if tokenizer is None else tokenizer.eos_id
        problems.extend(check_splits(data, needed_splits, eos_id=eos_id))


def _tokenizer(data: DataConfig, problems: list[str]) -> GLMTokenizer | None:
    if data.tokenizer_type is None:
        return None
    from megatron_glm.data.tokenizers import tokenizer_from_spec

    try:
        tok = tokenizer_from_spec(data.tokenizer_spec)
    except (OSError, ValueError, RuntimeError) as err:
        problems.append(f"tokenizer: {err}")
        return None
    return tok


# TrainingConfig fields set from the command-line flag of the same name (the others are derived).
_TRAINING_FLAGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "exit_interval",
    "lr",
    "min_lr",
    "lr_decay_ratio",
    "lr_decay_style",
    "lr_decay_iters",
    "warmup",
    "lr_warmup_iters",
    "loss_normalization",
    "save",
    "load",
    "load_pretrained",
    "save_interval",
    "keep_last_k",
    "eval_interval",
    "eval_iters",
    "log_interval",
    "log_json",
    "tensorboard_dir",
    "peak_tflops",
    "seed",
    "distributed_backend",
)


def _wants_fp16(raw: dict[str, Any]) -> bool:
    return bool((raw.get("fp16") or {}).get("enabled", False))


def _cpu_fp16_supported() -> bool:
    """DeepSpeed's own test (``deepspeed.initialize`` refuses fp16 when it is False); imported
    only when fp16 is asked for on CPU, since importing DeepSpeed takes seconds."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def _ds_config(
    args: argparse.Namespace, world_size: int, cuda: bool, problems: list[str]
) -> ResolvedDSConfig | None:
    """The DeepSpeed JSON given with ``--deepspeed_config`` (Megatron's flags filled in and checked
    against it), or the one Megatron's flags mean."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ds_path = getattr(args, "deepspeed_config", None)
    if ds_path:
        raw, ds_problems = load_ds_json(ds_path)
        problems.extend(ds_problems)
        if raw is None:
            return None
        merge_problems = merge_flags_into_ds_config(raw, args, ds_path)
        problems.extend(merge_problems)
        if merge_problems:
            return None
    else:
        raw = ds_config_from_flags(args)
        if args.micro_batch_size is None and args.global_batch_size is None:
            problems.append(
                "no batch size: pass --deepspeed_config (the DeepSpeed JSON: batch sizes, "
                "optimizer, ZeRO, precision) or Megatron's --micro-batch-size/--global-batch-size"
            )
            return None
    divisible = tp >= 1 and pp >= 1 and world_size % (tp * pp) == 0
    ds, ds_problems = resolve_ds_config(
        raw,
        data_parallel_size=world_size // (tp * pp) if divisible else None,
        pipeline_parallel_size=pp,
        cli_lr=args.lr,
        cuda=cuda,
        cpu_fp16=not cuda and _wants_fp16(raw) and _cpu_fp16_supported(),
    )
    problems.extend(ds_problems)
    if ds is not None and args.min_lr is not None and args.min_lr > ds.peak_lr:
        problems.append(f"--min-lr {args.min_lr} is larger than the peak LR {ds.peak_lr}")
    return ds


def _training_config(
    args: argparse.Namespace, ds: ResolvedDSConfig | None, problems: list[str]
) -> TrainingConfig | None:
    train_iters = args.train_iters
    if train_iters is None and args.train_samples is not None and ds is not None:
        train_iters = train_iters_from_samples(args.train_samples, ds.train_batch_size)
    if train_iters is None:
        if args.train_samples is None:
            problems.append("--train-iters (or Megatron's --train-samples) is required")
        train_iters = 1
    values: dict[str, Any] = {name: getattr(args, name) for name in _TRAINING_FLAGS}
    values.update(
        train_iters=train_iters,
        load_rng=not args.no_load_rng,
        save_layout_free=not args.no_layout_free_state,
        load_optim=not args.no_load_optim,
        load_lr_scheduler=not args.no_load_lr_scheduler,
        load_fallback=args.load_fallback,
        verify_checkpoint_hashes=not args.no_verify_checkpoint_hashes,
        progress_bar=not args.no_progress_bar,
    )
    # problems() without raising, so they join the others in one message
    probe = TrainingConfig.__new__(TrainingConfig)
    probe.__dict__.update(values)
    training_problems = probe.problems()
    problems.extend(training_problems)
    if training_problems:
        return None
    training = TrainingConfig(**values)
    if training.lr is None and ds is not None:
        training = dataclasses.replace(training, lr=ds.peak_lr)
    return training


def build_run_config(
    args: argparse.Namespace, world_size: int, *, cuda: bool | None = None, check_data: bool = True
) -> RunConfig:
    """Validate ``args`` for a job of ``world_size`` processes; ``ConfigError`` lists every problem."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    compat = apply_compat(args, cuda=cuda)
    problems: list[str] = list(compat.problems)
    ds = _ds_config(args, world_size, cuda, problems)

    data: DataConfig | None = None
    try:
        data = DataConfig.from_args(args)
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    tokenizer = _tokenizer(data, problems) if data is not None else None
    finetuning = getattr(args, "task", None) is not None
    task = _finetune_task(args, ds, tokenizer, problems) if finetuning else None
    training = _training_config(args, ds, problems)
    tokenizer_vocab = None if tokenizer is None else tokenizer.vocab_size
    # ids the model must embed: the tokenizer's, plus the [MASKi]/[sopi] pairs of sentinel tokens
    needed_vocab = tokenizer_vocab
    if tokenizer_vocab is not None and data is not None and data.infilling.sentinel_token:
        needed_vocab = tokenizer_vocab + 2 * (data.shape_plan.max_spans - 1)
    model = _model_config(args, needed_vocab, problems)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    notes = list(compat.notes)
    if model is not None:
        _check_layout(model, tp, pp, world_size, problems)
        _configure_sequence_parallel(model, data, ds, tp, pp, problems, notes)
        if needed_vocab is not None and needed_vocab > model.vocab_size:
            sentinels = (
                ""
                if needed_vocab == tokenizer_vocab
                else (f" (with {needed_vocab - tokenizer_vocab} sentinel tokens)")
            )
            problems.append(
                f"the tokenizer has {needed_vocab} tokens{sentinels}, more than the model "
                f"vocabulary --vocab-size {model.vocab_size}"
            )
        longest = _longest_positions(data, task)
        if longest is not None and longest[1] > model.max_sequence_length:
            problems.append(
                f"{longest[0]} {longest[1]} is larger than "
                f"max-position-embeddings {model.max_sequence_length}"
            )
    failure = failure_config_from_args(args, problems)
    validation = training is not None and bool(training.eval_interval)
    if data is not None and check_data and not finetuning:
        _check_data(data, tokenizer, ("train", "valid") if validation else ("train",), problems)
    if training is not None:
        _check_checkpoints(training, model, problems)
    if problems:
        raise ConfigError(problems)
    assert model is not None and training is not None and data is not None and ds is not None
    return RunConfig(
        model=model,
        training=training,
        data=data,
        ds=ds,
        world_size=world_size,
        failure=failure,
        dialect=compat.dialect,
        notes=notes,
        task=task,
    )


def _longest_positions(data: DataConfig | None, task: Any) -> tuple[str, int] | None:
    """The flag that sets the largest position a sample uses, and its value."""
    if task is not None and task.is_seq2seq:
        src, tgt = task.src_seq_length, task.tgt_seq_length
        return ("src-seq-length", src) if src >= tgt else ("tgt-seq-length", tgt)
    return None if data is None else ("seq-length", data.seq_length)


def _finetune_task(
    args: argparse.Namespace,
    ds: ResolvedDSConfig | None,
    tokenizer: GLMTokenizer | None,
    problems: list[str],
) -> Any:
    """The task flags and the task's files, checked; ``--epochs`` becomes ``--train-iters``."""
    from megatron_glm.tasks.finetune import (
        check_task_data,
        finetune_config_from_args,
        iterations_for_epochs,
    )

    config = finetune_config_from_args(args)
    config_problems = config.problems()
    problems.extend(config_problems)
    if config_problems or tokenizer is None:
        return config
    num_train, data_problems = check_task_data(config, tokenizer)
    problems.extend(data_problems)
    if args.train_iters is None and config.epochs is None:
        problems.append("--epochs or --train-iters is required")
    elif args.train_iters is None and ds is not None and num_train:
        args.train_iters = iterations_for_epochs(config.epochs, num_train, ds.train_batch_size)
    elif args.train_iters is None:
        args.train_iters = 1  # unknown until the problems above are fixed; do not add one
    return config


# Where a finetuning run keeps the checkpoint of its best validation, under --save.
BEST_DIR = "best"


def own_outputs(training: TrainingConfig) -> tuple[str, ...]:
    """Files this run writes that may sit in its --load directory before its first checkpoint
    (the --save lock of a job that died is one; a finetuning run's best checkpoint another)."""
    from megatron_glm.training.run_lock import LOCK_FILE

    save = training.save
    lock = os.path.join(save, LOCK_FILE) if save else None
    best = os.path.join(save, BEST_DIR) if save else None
    return tuple(p for p in (training.log_json, training.tensorboard_dir, lock, best) if p)


def _check_checkpoints(
    training: TrainingConfig, model: GLMConfig | None, problems: list[str]
) -> None:
    """--load must hold a complete checkpoint of ours (of this model, verified but for the
    digests) or nothing; --load-pretrained must hold weights of this run's architecture (read
    from the checkpoint's config, not its tensors).
    A checkpoint to resume takes precedence: --load-pretrained is then not looked at, so a
    relaunch resumes even when the pretrained weights have moved since."""
    from megatron_glm.training.checkpointing import (
        LoadDirError,
        checkpoint_to_resume,
        find_latest_checkpoint,
    )

    resume = None
    if training.load:
        try:  # every rank checks: sizes, not digests (rank 0 reads those when the run starts)
            resume = checkpoint_to_resume(
                training.load,
                ignore=own_outputs(training),
                model=model,
                hashes=False,
                fallback=training.load_fallback,
            )
        except LoadDirError as err:
            problems.append(str(err))
            return
    if not training.load_pretrained or resume is not None:
        return
    if training.save and not training.load:
        saved = find_latest_checkpoint(training.save)
        if saved is not None:
            problems.append(
                f"--save {training.save} already holds checkpoint {saved.iteration} and --load "
                f"is not given: this run would start again from --load-pretrained and overwrite "
                f"it; pass --load {training.save} to resume it"
            )
    problems.extend(pretrained_problems(training.load_pretrained, model))


def pretrained_problems(path: str, model: GLMConfig | None) -> list[str]:
    """Why ``--load-pretrained path`` cannot initialise ``model``: a missing path, no checkpoint
    form megatron_glm reads, or an architecture that differs (every differing field, by the rule
    the forms apply when they read). Reads only the checkpoint's config; the official layout has
    none (only its tensor shapes tell), so it is checked when its weights are loaded."""
    from megatron_glm.conversion import CheckpointError, detect_form
    from megatron_glm.conversion.canonical import config_problems

    if not os.path.exists(path):
        return [f"--load-pretrained {path} does not exist"]
    try:
        form = detect_form(path)
        checkpoint_config = read_checkpoint_config(path, form)
    except CheckpointError as err:
        return [f"--load-pretrained: {problem}" for problem in err.problems]
    if model is None or checkpoint_config is None:
        return []
    return [
        f"--load-pretrained ({form} form) does not fit this run's model: {problem}"
        for problem in config_problems(checkpoint_config, model, path)
    ]


def read_checkpoint_config(path: str, form: str) -> GLMConfig | None:
    """The architecture a checkpoint of ``form`` declares, read from its small files (no
    tensors); None for the official layout, which declares none."""
    import json

    from megatron_glm.conversion import CheckpointError, consolidated, get_form, hf
    from megatron_glm.conversion.deepspeed_form import read_meta, resolve_checkpoint_dir

    reader = getattr(get_form(form), "read_config", None)
    if reader is not None:  # a form that says itself
        return reader(Path(path))
    if form == "deepspeed":
        tag_dir = resolve_checkpoint_dir(Path(path))
        try:
            return GLMConfig(**read_meta(tag_dir)["config"]["model"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError([f"{tag_dir}: invalid model config ({err})"]) from None
    if form not in ("consolidated", "hf"):
        return None
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    config_file = directory / "config.json"
    try:
        obj = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError([f"{config_file}: cannot be read as JSON ({err})"]) from None
    if form == "hf":
        return hf.config_from_hf(obj, str(config_file))
    return consolidated.config_from_dict(obj, str(config_file))


def parse_run_config(argv: Sequence[str] | None, world_size: int, **kwargs: Any) -> RunConfig:
    """Parse and validate a command line (``argv`` without the program name)."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    return build_run_config(args, world_size, **kwargs)
