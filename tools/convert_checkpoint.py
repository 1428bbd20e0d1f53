"""Convert a GLM checkpoint from one form to another (docs/checkpoints.md#toolsconvert_checkpointpy).

    python tools/convert_checkpoint.py --input checkpoints/glm-tiny --output glm-tiny-hf --to hf
    python tools/convert_checkpoint.py --input glm-large-release --output start-tp2 \\
        --to deepspeed --target-tensor-parallel-size 2 --preset large

The input form is detected from its files: a megatron_glm training checkpoint (the --save
directory or one iteration directory), a consolidated directory, an official GLM checkpoint, or
a Hugging Face directory. --to picks the output form:

  deepspeed     megatron_glm's layout at any --target-tensor/pipeline-parallel-size, weights only
                (a start for pretrain_glm.py --load-pretrained; no optimizer state to resume)
  consolidated  config.json + model.safetensors (TP 1) + the tokenizer files
  official      the official GLM layout (mp_rank_XX_model_states.pt) at any TP size
  hf            the Hugging Face layout of THUDM's glm-* repositories

The official layout carries no model config: give it with --config config.json, or --preset and
/ or the size flags (--num-attention-heads defaults to hidden size / 64, the head size of every
released GLM). For inputs that carry a config, these flags are checked against it. The
--tokenizer-* flags record (and, for the consolidated form, copy) the tokenizer the weights
belong to.

Security: official and DeepSpeed .pt files are Python pickles; they are read with
torch.load(..., weights_only=True), which rebuilds tensors and plain data only, never arbitrary
objects. Everything written besides the .pt files of the deepspeed and official forms is JSON or
safetensors.

Nothing is written to --output unless the whole conversion succeeds (every form builds its output
in a temporary sibling directory and renames it); an existing non-empty --output is refused. Exit
status: 0 converted; 2 bad input or options (every problem listed); 1 an I/O failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megatron_glm.config import GLMConfig  # noqa: E402
from megatron_glm.config.data import (  # noqa: E402
    TokenizerSpec,
    add_tokenizer_args,
    tokenizer_spec_from_args,
)
from megatron_glm.config.model import (
    ARCHITECTURE_FLAGS,  # noqa: E402
    PRESETS,  # noqa: E402
)
from megatron_glm.conversion import (  # noqa: E402
    FORM_NAMES,
    CheckpointError,
    detect_form,
    get_form,
)
from megatron_glm.conversion.canonical import (  # noqa: E402
    REQUIRED_FIELDS,
    CanonicalCheckpoint,
    cast_state,
    config_from_dict,
    state_problems,
)
from megatron_glm.conversion.consolidated import TOKENIZER_FILE_FIELDS  # noqa: E402
from megatron_glm.conversion.files import output_problem, read_json_object  # noqa: E402
from megatron_glm.conversion.official import RELEASED_HEAD_DIM  # noqa: E402

logger = logging.getLogger("convert_checkpoint")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="checkpoint to read (its form is detected)")
    p.add_argument("--output", required=True, help="directory to create (must not be non-empty)")
    p.add_argument("--to", required=True, choices=FORM_NAMES, help="output form")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument(
        "--target-pipeline-parallel-size", type=int, default=1, help="deepspeed form only"
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="cast the weights (default: keep the input's dtype)",
    )
    g = p.add_argument_group("model config (for inputs without one; checked against the others)")
    g.add_argument("--config", default=None, help="a config.json of GLMConfig fields")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument(
        "--num-attention-heads",
        type=int,
        help=f"default: hidden size / {RELEASED_HEAD_DIM} when --hidden-size is given",
    )
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary (before padding)")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    add_tokenizer_args(p)
    return p


def model_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The GLMConfig fields the model flags give (--config or --preset, then the size flags)."""
    flags = {
        field: getattr(args, dest)
        for dest, field in ARCHITECTURE_FLAGS.items()
        if getattr(args, dest) is not None
    }
    if args.config is not None and args.preset is not None:
        raise ValueError("give --config or --preset, not both")
    fields: dict[str, Any] = {}
    if args.config is not None:
        fields = read_json_object(Path(args.config))
    elif args.preset is not None:
        fields = dict(PRESETS[args.preset])
    fields.update(flags)
    return fields


# the flag that gives each GLMConfig field
FLAG_OF = {field: "--" + dest.replace("_", "-") for dest, field in ARCHITECTURE_FLAGS.items()}


def complete_config(
    fields: dict[str, Any], *, heads_given: bool, hidden_given: bool
) -> GLMConfig | None:
    """A ``GLMConfig`` from ``fields`` when they describe a whole model; ``None`` when a required
    field is missing; ``ValueError`` when the values are invalid (the message names them).

    Without --num-attention-heads the heads are hidden / 64 when the fields have none, or when
    --hidden-size replaced the hidden size of a preset or config file (its heads would not fit).
    """
    fields = dict(fields)
    hidden = fields.get("hidden_size")
    derive = "num_attention_heads" not in fields or hidden_given
    if not heads_given and derive and isinstance(hidden, int) and hidden >= RELEASED_HEAD_DIM:
        fields["num_attention_heads"] = hidden // RELEASED_HEAD_DIM
        logger.info(
            "--num-attention-heads not given: %d (hidden size %d / head size %d, as in every "
            "released GLM)",
            fields["num_attention_heads"],
            hidden,
            RELEASED_HEAD_DIM,
        )
    if any(field not in fields for field in REQUIRED_FIELDS):
        return None
    return config_from_dict(fields, "the model flags")


def missing_config_problem(fields: dict[str, Any]) -> str:
    missing = [FLAG_OF[field] for field in REQUIRED_FIELDS if field not in fields]
    return f"the model config is incomplete: give {', '.join(missing)} (or --preset / --config)"


def apply_partial_config(
    checkpoint: CanonicalCheckpoint, fields: dict[str, Any], form: str, origin: str
) -> None:
    """A few model flags for an input read without a whole config: they replace what the reader
    had to assume (the official layout's head count and vocabulary; the Hugging Face vocabulary,
    which is the padded table there) and must agree with everything the files say."""
    config = checkpoint.config
    assumed = set(checkpoint.extra.get("assumed", {}))
    if form in ("official", "hf") and config.vocab_size == config.padded_vocab_size:
        assumed.add("vocab_size")  # the table's rows: the tokenizer's own size is not stored
    overrides = {k: v for k, v in fields.items() if k in assumed and getattr(config, k) != v}
    problems = [
        f"{origin}: {field} is {getattr(config, field)!r}, {FLAG_OF.get(field, field)} says "
        f"{value!r}"
        for field, value in fields.items()
        if field not in overrides and getattr(config, field, value) != value
    ]
    if not problems and overrides:
        try:
            checkpoint.config = GLMConfig(**{**config.to_dict(), **overrides})
        except ValueError as err:
            problems.append(f"{origin}: {err}")
        else:
            problems = state_problems(checkpoint.state, checkpoint.config, origin)
            logger.info(
                "model config from the flags instead of the reader's assumption: %s",
                ", ".join(f"{k} = {v}" for k, v in overrides.items()),
            )
    if problems:
        raise CheckpointError(problems)


def tokenizer_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """The TokenizerSpec fields of the --tokenizer-* flags, file paths made absolute."""
    if args.tokenizer_type is None:
        return None
    fields = dataclasses.asdict(tokenizer_spec_from_args(args))
    for name in TOKENIZER_FILE_FIELDS:
        value = fields.get(name)
        if value:
            if not Path(value).exists():
                raise ValueError(f"--{name.replace('_', '-')} {value} does not exist")
            fields[name] = str(Path(value).resolve())
    return fields


def _check_tokenizer(spec: dict[str, Any], config: GLMConfig) -> None:
    from megatron_glm.data.tokenizers import tokenizer_from_spec

    tokenizer = tokenizer_from_spec(TokenizerSpec(**spec))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary of {config.vocab_size}: these weights were not trained with it"
        )


def _summary(checkpoint: CanonicalCheckpoint) -> str:
    config = checkpoint.config
    numel = sum(t.numel() for t in checkpoint.state.values())
    dtypes = "+".join(
        sorted({str(t.dtype).removeprefix("torch.") for t in checkpoint.state.values()})
    )
    return (
        f"{len(checkpoint.state)} tensors, {numel:,} parameters, {dtypes}; {config.num_layers} "
        f"layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, vocab "
        f"{config.vocab_size} (padded {config.padded_vocab_size}), iteration "
        f"{checkpoint.iteration if checkpoint.iteration is not None else 'unknown'}"
    )


def convert(args: argparse.Namespace) -> None:
    """Read ``--input``, write ``--output``; ``CheckpointError``/``ValueError`` for bad input."""
    problems = []
    source, out = Path(args.input), Path(args.output)
    fields: dict[str, Any] = {}
    config = None
    try:
        fields = model_fields(args)
        config = complete_config(
            fields,
            heads_given=args.num_attention_heads is not None,
            hidden_given=args.hidden_size is not None,
        )
    except ValueError as err:
        problems.append(str(err))
    try:
        spec = tokenizer_spec(args)
    except ValueError as err:
        problems.append(str(err))
        spec = None
    for flag, value in (
        ("--target-tensor-parallel-size", args.target_tensor_parallel_size),
        ("--target-pipeline-parallel-size", args.target_pipeline_parallel_size),
    ):
        if value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if (problem := output_problem(out)) is not None:  # checked again when writing
        problems.append(problem)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        problems.append(f"--output {out} is inside --input {source}")
    if problems:
        raise CheckpointError(problems)

    form_name = detect_form(source)
    logger.info("reading %s (%s form)", source, form_name)
    started = time.monotonic()
    try:
        checkpoint = get_form(form_name).read(source, config)
    except CheckpointError as err:
        if config is None and fields:  # a few flags given, the input needed a whole config
            raise CheckpointError([*err.problems, missing_config_problem(fields)]) from None
        raise
    checkpoint.check()
    if config is None and fields:  # a few flags: checked against the input, or filling in
        apply_partial_config(checkpoint, fields, form_name, str(source))
    logger.info("read %s in %.1f s", _summary(checkpoint), time.monotonic() - started)
    if spec is not None:
        _check_tokenizer(spec, checkpoint.config)
        if checkpoint.tokenizer and checkpoint.tokenizer != spec:
            logger.info("tokenizer of the input replaced by the --tokenizer-* flags")
        checkpoint.tokenizer = spec
    if args.dtype is not None:
        checkpoint.state = cast_state(checkpoint.state, DTYPES[args.dtype])
        logger.info("cast to %s", args.dtype)

    logger.info(
        "writing %s form (TP %d x PP %d) to %s",
        args.to,
        args.target_tensor_parallel_size,
        args.target_pipeline_parallel_size,
        out,
    )
    get_form(args.to).write(
        checkpoint,
        out,
        tensor_parallel=args.target_tensor_parallel_size,
        pipeline_parallel=args.target_pipeline_parallel_size,
    )
    logger.info(
        "wrote %s (%s form, TP %d x PP %d) in %.1f s",
        out,
        args.to,
        args.target_tensor_parallel_size,
        args.target_pipeline_parallel_size,
        time.monotonic() - started,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        convert(args)
    except CheckpointError as err:
        print(f"convert_checkpoint.py: {len(err.problems)} problem(s):", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"nothing was written to {args.output}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"convert_checkpoint.py: {err}", file=sys.stderr)
        print(f"nothing was written to {args.output}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"convert_checkpoint.py: {err}", file=sys.stderr)
        print(f"nothing was written to {args.output}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
