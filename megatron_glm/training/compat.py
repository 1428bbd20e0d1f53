"""Command lines of the official GLM recipes and of Megatron-LM's ``pretrain_gpt.py``.

``add_compat_args`` adds their flags to the trainer's parser; ``apply_compat`` rewrites a parsed
namespace into the trainer's own flags, with each flag's meaning in the program it comes from, and
returns the problems (flags that cannot be honoured, contradictions) and the notes (deliberate
differences and flags without effect), which the trainer prints once at start-up.
``ds_config_from_flags`` builds the DeepSpeed JSON from Megatron's flags when none is given, as
Megatron-DeepSpeed does; ``merge_flags_into_ds_config`` checks them against a given JSON.
docs/compatibility.md lists every flag and difference.

Defaults follow the dialect of the command line: a line with ``--block-lm`` (every official
recipe has it) gets the official GLM's defaults for the flags it leaves out, a line with any
Megatron-only flag gets Megatron's, any other line the trainer's own (docs/training.md).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Any

# Official flags about its own data loader (lazy loading of raw json, scattering files over
# ranks): the indexed dataset here is memory-mapped and sharded by sample, so they do nothing.
_LOADER_NOOPS = (
    "--lazy-loader",
    "--no-lazy-loader",
    "--half-lazy-loader",
    "--shuffle",
    "--loose-json",
    "--presplit-sentences",
    "--no-pre-tokenize",
)

# Defaults of the flags that differ between the dialects, by namespace attribute.
_DEFAULTS = {
    "ours": {
        "lr_decay_style": "cosine",
        "lr_decay_ratio": 0.1,
        "warmup": 0.01,
        "eval_iters": 10,
        "log_interval": 10,
        "eval_interval": None,
        "save_interval": None,
    },
    # THUDM/GLM arguments.py
    "official": {
        "lr_decay_style": "linear",
        "lr_decay_ratio": 0.1,
        "warmup": 0.01,
        "eval_iters": 100,
        "log_interval": 100,
        "eval_interval": 1000,
        "save_interval": 5000,
    },
    # Megatron-LM arguments.py: no warmup, decay to --min-lr 0
    "megatron": {
        "lr_decay_style": "linear",
        "lr_decay_ratio": 0.0,
        "warmup": 0.0,
        "eval_iters": 100,
        "log_interval": 100,
        "eval_interval": 1000,
        "save_interval": None,
    },
}

# Megatron-only flags (attribute -> flag); any of them makes a command line Megatron's dialect.
_MEGATRON_FLAGS = {
    "micro_batch_size": "--micro-batch-size",
    "global_batch_size": "--global-batch-size",
    "bf16": "--bf16",
    "weight_decay": "--weight-decay",
    "clip_grad": "--clip-grad",
    "adam_beta1": "--adam-beta1",
    "adam_beta2": "--adam-beta2",
    "adam_eps": "--adam-eps",
    "lr_warmup_fraction": "--lr-warmup-fraction",
    "lr_warmup_iters": "--lr-warmup-iters",
    "train_samples": "--train-samples",
    "recompute_activations": "--recompute-activations",
    "use_flash_attn": "--use-flash-attn",
    "use_distributed_optimizer": "--use-distributed-optimizer",
    "zero_stage": "--zero-stage",
}


# What an official recipe computes differently here, on purpose (docs/compatibility.md): printed
# once at the start of every run whose command line is the official dialect.
OFFICIAL_DIFFERENCES = (
    "deliberate differences from the official GLM code: every mask is a pure function of (seed, "
    "sample index), so a resumed run repeats itself and the worker count does not matter; "
    "micro-batches have a fixed shape (no sample is dropped, no batch multiplied); "
    "a document ends with one [eos] whether or not the corpus was made with --append-eod"
)


@dataclass
class CompatReport:
    """What ``apply_compat`` found: problems make the command line invalid, notes are printed."""

    dialect: str  # "ours", "official" or "megatron"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("official GLM flags (docs/compatibility.md)")
    g.add_argument("--block-lm", action="store_true", help="accepted: GLM is always a block LM")
    g.add_argument(
        "--model-parallel-size", type=int, default=None, help="= --tensor-model-parallel-size"
    )
    g.add_argument(
        "--experiment-name",
        default=None,
        help="checkpoints go to SAVE/NAME (SAVE/basename(LOAD) when --load is given)",
    )
    g.add_argument(
        "--new-save-directory",
        action="store_true",
        help="with --load and --experiment-name: save to SAVE/NAME, not SAVE/basename(LOAD)",
    )
    g.add_argument(
        "--resume-dataloader",
        action="store_true",
        help="accepted: the data position is always restored on resume",
    )
    g.add_argument(
        "--deepspeed-activation-checkpointing",
        action="store_true",
        help="accepted with --checkpoint-activations (recomputation is RNG-tracked here)",
    )
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    g.add_argument(
        "--no-load-optim", action="store_true", help="resume without the optimizer state"
    )
    g.add_argument(
        "--no-load-lr-scheduler",
        action="store_true",
        help="resume without the LR scheduler state (the schedule restarts from the new flags)",
    )
    for flag in _LOADER_NOOPS:
        g.add_argument(flag, action="store_true", help="accepted, no effect here")
    g.add_argument("--loader-scatter", type=int, default=None, help="accepted, no effect here")
    g.add_argument("--train-data", nargs="+", default=None, help=argparse.SUPPRESS)
    g.add_argument("--valid-data", nargs="*", default=None, help=argparse.SUPPRESS)
    g.add_argument("--test-data", nargs="*", default=None, help=argparse.SUPPRESS)
    g.add_argument("--filter-english", action="store_true", help=argparse.SUPPRESS)

    g = parser.add_argument_group("Megatron-LM flags (docs/compatibility.md)")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--weight-decay", type=float, default=None, help="Megatron default 0.01")
    g.add_argument("--clip-grad", type=float, default=None, help="Megatron default 1.0")
    g.add_argument("--adam-beta1", type=float, default=None, help="default 0.9")
    g.add_argument("--adam-beta2", type=float, default=None, help="default 0.999")
    g.add_argument("--adam-eps", type=float, default=None, help="default 1e-8")
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None, help="= --train-iters x global batch")
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument(
        "--use-flash-attn",
        action="store_true",
        help="the fastest exact attention backend here (--attention-backend auto)",
    )
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="shard the optimizer state over data parallelism (ZeRO stage 1)",
    )
    g.add_argument("--zero-stage", type=int, default=None, help="Megatron-DeepSpeed's flag")
    g.add_argument(
        "--distributed-backend",
        choices=("nccl", "gloo", "mpi"),
        default=None,
        help="torch.distributed backend (default nccl with CUDA, else gloo)",
    )


def dialect_of(args: argparse.Namespace) -> str:
    if args.block_lm:
        return "official"
    if any(getattr(args, attr) not in (None, False) for attr in _MEGATRON_FLAGS):
        return "megatron"
    return "ours"


def _given(args: argparse.Namespace, attr: str) -> bool:
    return getattr(args, attr) is not None


def apply_compat(args: argparse.Namespace, *, cuda: bool) -> CompatReport:
    """Rewrite the official/Megatron flags of ``args`` into the trainer's own, in place."""
    report = CompatReport(dialect_of(args))
    problems, notes = report.problems, report.notes
    if args.train_data or args.valid_data or args.test_data:
        problems.append(
            "--train-data/--valid-data/--test-data name corpora hard-coded in the official GLM "
            "code; preprocess your corpus with tools/preprocess_data.py (the same tokenizer "
            "flags as this command) and pass --data-path PREFIX (several: "
            "'--data-path W1 P1 W2 P2')"
        )
    if args.filter_english:
        problems.append(
            "--filter-english filtered raw text inside the official loader; filter the corpus "
            "before tools/preprocess_data.py and drop the flag"
        )
    if args.fp16 and args.bf16:
        problems.append("--fp16 and --bf16 together; pick one")
    _apply_defaults(args, report)
    _apply_layout(args, report, cuda)
    _apply_schedule(args, report)
    if args.recompute_activations:
        if args.checkpoint_activations:
            notes.append("--recompute-activations with --checkpoint-activations: full recompute")
        args.checkpoint_activations = True
        notes.append(
            "--recompute-activations recomputes whole layers here (Megatron's selective "
            "recompute of the attention core is not implemented)"
        )
    if args.deepspeed_activation_checkpointing:
        if not args.checkpoint_activations:
            problems.append("--deepspeed-activation-checkpointing needs --checkpoint-activations")
        notes.append(
            "--deepspeed-activation-checkpointing: layers are recomputed by megatron_glm's own "
            "RNG-tracked checkpointing (the JSON's activation_checkpointing section is ignored)"
        )
    if args.use_flash_attn:
        if args.attention_backend not in (None, "auto"):
            problems.append(
                f"--use-flash-attn and --attention-backend {args.attention_backend} disagree"
            )
        args.attention_backend = "auto"
        notes.append(
            "--use-flash-attn: attention backend 'auto' (flex attention on CUDA, SDPA on CPU; "
            "dense where dropout makes the fused path slower)"
        )
    used_noops = [f for f in _LOADER_NOOPS if getattr(args, f[2:].replace("-", "_"))]
    if args.loader_scatter is not None:
        used_noops.append("--loader-scatter")
    if args.resume_dataloader:
        used_noops.append("--resume-dataloader")
    if args.block_lm:
        used_noops.append("--block-lm")
    if used_noops:
        notes.append(
            f"{' '.join(used_noops)}: accepted without effect (the data position is always "
            "resumed, samples are read from memory-mapped indexed datasets, every model is a "
            "GLM block LM)"
        )
    return report


def _apply_defaults(args: argparse.Namespace, report: CompatReport) -> None:
    applied = []
    for attr, value in _DEFAULTS[report.dialect].items():
        if getattr(args, attr) is None:
            setattr(args, attr, value)
            if attr == "lr_decay_ratio" and args.min_lr is not None:
                continue  # --min-lr sets the final LR
            if value != _DEFAULTS["ours"][attr]:
                applied.append(f"--{attr.replace('_', '-')} {value}")
    if report.dialect == "official":
        report.notes.append(OFFICIAL_DIFFERENCES)
        if args.loss_normalization == "global":
            report.notes.append(
                "the loss is the mean over every loss token of the global batch, the same in "
                "every layout (the official code averages per micro-batch: "
                "--loss-normalization micro-batch)"
            )
    if not args.save and report.dialect == "official":
        args.save_interval = None  # the official default interval needs a --save directory
    if applied:
        report.notes.append(
            f"{report.dialect} command line: the {report.dialect} defaults of the flags left out: "
            + ", ".join(applied)
        )


def _apply_layout(args: argparse.Namespace, report: CompatReport, cuda: bool) -> None:
    if args.model_parallel_size is not None:
        if args.tensor_model_parallel_size not in (None, args.model_parallel_size):
            report.problems.append(
                f"--model-parallel-size {args.model_parallel_size} and "
                f"--tensor-model-parallel-size {args.tensor_model_parallel_size} disagree"
            )
        args.tensor_model_parallel_size = args.model_parallel_size
    if args.tensor_model_parallel_size is None:
        args.tensor_model_parallel_size = 1
    if args.distributed_backend == "nccl" and not cuda:
        report.notes.append("--distributed-backend nccl needs CUDA: this CPU run uses gloo")
        args.distributed_backend = "gloo"
    if args.experiment_name:
        if not args.save:
            report.problems.append("--experiment-name needs --save (checkpoints go to SAVE/NAME)")
        else:
            name = args.experiment_name
            if args.load and not args.new_save_directory:
                # the official code continues a loaded run in a directory of the same name
                name = os.path.basename(os.path.normpath(args.load))
            args.save = os.path.join(args.save, name)
            report.notes.append(
                f"--experiment-name: checkpoints go to {args.save} (the official code appends the "
                "start time to the name; here the name is kept, so relaunching resumes)"
            )


def _apply_schedule(args: argparse.Namespace, report: CompatReport) -> None:
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters is not None:
        report.problems.append("give --lr-warmup-fraction or --lr-warmup-iters, not both")
    if args.lr_warmup_fraction is not None:
        args.warmup = args.lr_warmup_fraction  # both are fractions of the decay iterations
    if args.train_samples is not None and args.train_iters is not None:
        report.problems.append("give --train-iters or --train-samples, not both")


def train_iters_from_samples(train_samples: int, global_batch: int) -> int:
    """Megatron's ``--train-samples``: the iterations that consume that many samples."""
    return max(1, math.ceil(train_samples / global_batch))


# ---- the DeepSpeed JSON and Megatron's flags ----------------------------------------------------

# (namespace attribute, flag, JSON path, Megatron default when building a JSON)
_JSON_FLAGS: tuple[tuple[str, str, tuple[str, ...], Any], ...] = (
    ("micro_batch_size", "--micro-batch-size", ("train_micro_batch_size_per_gpu",), None),
    ("global_batch_size", "--global-batch-size", ("train_batch_size",), None),
    ("clip_grad", "--clip-grad", ("gradient_clipping",), 1.0),
    ("weight_decay", "--weight-decay", ("optimizer", "params", "weight_decay"), 0.01),
    ("adam_eps", "--adam-eps", ("optimizer", "params", "eps"), 1e-8),
    ("zero_stage", "--zero-stage", ("zero_optimization", "stage"), None),
)


def _json_get(cfg: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _json_set(cfg: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _flag_values(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...], Any]]:
    """(the flag as given, JSON path, value) of every JSON-owned flag on the command line."""
    out = [
        (f"{flag} {getattr(args, attr)}", path, getattr(args, attr))
        for attr, flag, path, _ in _JSON_FLAGS
        if getattr(args, attr) is not None
    ]
    if args.use_distributed_optimizer:
        out.append(
            ("--use-distributed-optimizer (ZeRO stage 1)", ("zero_optimization", "stage"), 1)
        )
    return out


def _betas_flags(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    return [
        (flag, i, value)
        for i, (flag, value) in enumerate(
            (("--adam-beta1", args.adam_beta1), ("--adam-beta2", args.adam_beta2))
        )
        if value is not None
    ]


def _precision_of(cfg: dict[str, Any]) -> str:
    if (cfg.get("fp16") or {}).get("enabled"):
        return "fp16"
    if (cfg.get("bf16") or cfg.get("bfloat16") or {}).get("enabled"):
        return "bf16"
    return "fp32"


def ds_config_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed JSON a Megatron command line means (Megatron's defaults for what it leaves
    out: AdamW with betas (0.9, 0.999), eps 1e-8, weight decay 0.01, clipping 1.0, fp16 with a
    dynamic scale from 2^32)."""
    cfg: dict[str, Any] = {
        "optimizer": {
            "type": "AdamW",
            "params": {"betas": [0.9, 0.999]},
        },
    }
    if args.lr is not None:
        cfg["optimizer"]["params"]["lr"] = args.lr
    for attr, _, path, default in _JSON_FLAGS:
        value = getattr(args, attr)
        if value is None:
            value = default
        if value is not None:
            _json_set(cfg, path, value)
    for _, i, value in _betas_flags(args):
        cfg["optimizer"]["params"]["betas"][i] = value
    if args.use_distributed_optimizer:
        _json_set(cfg, ("zero_optimization", "stage"), 1)
    if args.fp16:
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 32,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif args.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def merge_flags_into_ds_config(
    cfg: dict[str, Any], args: argparse.Namespace, path: str
) -> list[str]:
    """Fill the JSON ``cfg`` (in place) from the flags it leaves open; a flag that contradicts a
    value the JSON sets is a problem naming both."""
    problems: list[str] = []

    for given, json_path, value in _flag_values(args):
        current = _json_get(cfg, json_path)
        if current is None:
            _json_set(cfg, json_path, value)
        elif not _same(current, value):
            problems.append(f"{given} contradicts {'.'.join(json_path)} = {current} in {path}")
    betas = _json_get(cfg, ("optimizer", "params", "betas"))
    for flag, i, value in _betas_flags(args):
        if betas is None:
            betas = [0.9, 0.999]
            _json_set(cfg, ("optimizer", "params", "betas"), betas)
        if not _same(betas[i], value):
            problems.append(
                f"{flag} {value} contradicts optimizer.params.betas = {betas} in {path}"
            )
    precision = _precision_of(cfg)
    for flag, wanted in (("--fp16", "fp16"), ("--bf16", "bf16")):
        if not getattr(args, wanted):
            continue
        if precision == "fp32":
            cfg[wanted] = {"enabled": True}
        elif precision != wanted:
            problems.append(f"{flag} contradicts {path}, which enables {precision}")
    return problems


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b
