"""Fill the blanks of prompts with a GLM checkpoint (docs/generation.md).

    python tools/generate.py --load-pretrained CKPT --prompt "Paris is the [MASK] of France."
    python tools/generate.py --load-pretrained CKPT --input-file in.jsonl --output-file out.jsonl
    python tools/generate.py --load-pretrained CKPT           # interactive: one prompt per line
    torchrun --nproc-per-node 2 tools/generate.py ...         # tensor parallel over 2 processes

``CKPT`` is a checkpoint of any form (a training run's ``--save`` directory, consolidated, the
official GLM layout, Hugging Face). The tokenizer is the one the checkpoint records unless the
tokenizer flags name one. The sampling flags are the official ``generate_samples.py``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_glm.config.data import add_tokenizer_args, tokenizer_spec_from_args  # noqa: E402
from megatron_glm.data.tokenizers import GLMTokenizer, tokenizer_from_spec  # noqa: E402
from megatron_glm.inference import GenerationConfig, generate  # noqa: E402
from megatron_glm.inference.loading import load_model_for_generation  # noqa: E402
from megatron_glm.inference.prompts import prepare_prompt, read_prompt_file  # noqa: E402
from megatron_glm.model import GLMModel  # noqa: E402

logger = logging.getLogger("generate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-pretrained", required=True, help="checkpoint (any form)")
    g = parser.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--input-file", help='jsonl, one {"prompt": text or ids} per line')
    g.add_argument("--output-file", help='jsonl: each input record plus "output" and "blanks"')
    g.add_argument("--batch-size", type=int, default=8, help="prompts run together")
    g.add_argument(
        "--task-mask",
        action="store_true",
        help="append [gMASK] (not [MASK]) to a prompt without a blank, as the official code does "
        "for models pretrained with --task-mask",
    )
    g = parser.add_argument_group("decoding (official names)")
    g.add_argument("--out-seq-length", type=int, default=256, help="max tokens per blank")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--min-tgt-length", type=int, default=0)
    g.add_argument("--seed", type=int, default=1234)
    g = parser.add_argument_group("model")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="run in float16")
    precision.add_argument("--bf16", action="store_true", help="run in bfloat16")
    add_tokenizer_args(parser)
    return parser


def _config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(
        out_seq_length=args.out_seq_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        min_tgt_length=args.min_tgt_length,
        seed=args.seed,
    )


def _problems(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.prompt and args.input_file:
        problems.append("give --prompt or --input-file, not both")
    if args.output_file and not args.input_file:
        problems.append("--output-file needs --input-file")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if not Path(args.load_pretrained).exists():
        problems.append(f"--load-pretrained {args.load_pretrained} does not exist")
    try:
        _config(args)
    except ValueError as err:
        problems.append(str(err))
    return problems


def _interactive(rank: int) -> Iterator[str]:
    """Prompts typed on rank 0, shared with the other ranks; ends on EOF or "stop"."""
    while True:
        box: list[Any] = [None]
        if rank == 0:
            try:
                box[0] = input("\nprompt (stop to exit) >>> ").strip()
            except EOFError:
                box[0] = "stop"
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        if box[0] == "stop":
            return
        if box[0]:
            yield box[0]


def _run(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    args: argparse.Namespace,
    labelled: Sequence[tuple[str, str | list[int]]],
) -> list[dict[str, Any]]:
    """Generate for (label, prompt) pairs in batches; a bad prompt stops before any generation."""
    blank = "[gMASK]" if args.task_mask else "[MASK]"
    for label, prompt in labelled:
        prepare_prompt(tokenizer, prompt, model.config.max_sequence_length, label, blank)
    outputs = []
    config = _config(args)
    for start in range(0, len(labelled), args.batch_size):
        batch = [prompt for _, prompt in labelled[start : start + args.batch_size]]
        for result in generate(model, tokenizer, batch, config, append_blank=blank):
            outputs.append({"output": result.text, "blanks": result.blank_texts})
    return outputs


def main(argv: list[str] | None = None) -> int:
    from megatron_glm.training.launch import (
        discover_launch_env,
        init_distributed,
        shutdown_distributed,
    )

    args = build_parser().parse_args(argv)
    launch = discover_launch_env()
    logging.basicConfig(level=logging.INFO if launch.rank == 0 else logging.WARNING)
    problems = _problems(args)
    if problems:
        if launch.rank == 0:
            print("generate.py: " + "\n".join(problems), file=sys.stderr)
        return 2
    tp_group = None
    if launch.world_size > 1:
        init_distributed()
        tp_group = dist.group.WORLD
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else None
    finished = False
    try:
        records = read_prompt_file(args.input_file) if args.input_file else []
        loaded = load_model_for_generation(
            args.load_pretrained, tp_group=tp_group, dtype=dtype, device=device
        )
        if args.tokenizer_type:
            spec = tokenizer_spec_from_args(args)
        elif loaded.tokenizer_spec is not None:
            spec = loaded.tokenizer_spec
        else:
            raise ValueError(
                f"{args.load_pretrained} records no tokenizer: pass --tokenizer-type (and its files)"
            )
        tokenizer = tokenizer_from_spec(spec)
        if args.input_file:
            labelled = [(f"{args.input_file}:{n}", r["prompt"]) for n, r in records]
            outputs = _run(loaded.model, tokenizer, args, labelled)
            lines = [json.dumps({**r, **o}) for (_, r), o in zip(records, outputs)]
            if launch.rank == 0 and args.output_file:
                Path(args.output_file).write_text("".join(f"{line}\n" for line in lines))
            elif launch.rank == 0:
                print("\n".join(lines))
        elif args.prompt:
            labelled = [(f"--prompt {i + 1}", p) for i, p in enumerate(args.prompt)]
            for output in _run(loaded.model, tokenizer, args, labelled):
                if launch.rank == 0:
                    print(output["output"], flush=True)
        else:
            for prompt in _interactive(launch.rank):
                try:
                    (output,) = _run(loaded.model, tokenizer, args, [("prompt", prompt)])
                except ValueError as err:  # say why and ask again
                    output = {"output": f"({err})"}
                if launch.rank == 0:
                    print(output["output"], flush=True)
        finished = True
    except ValueError as err:  # a bad prompt, checkpoint or tokenizer: the user's to fix
        if launch.rank == 0:
            print(f"generate.py: {err}", file=sys.stderr)
        return 2
    finally:
        # after a barrier on a clean finish, as pretrain_glm.py does (see shutdown_distributed)
        shutdown_distributed(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
