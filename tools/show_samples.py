"""Show constructed GLM pretraining samples: Part A with its masks, Part B spans, the objective.

    python tools/show_samples.py --data-path data/docs_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \\
        --seq-length 128 --num-samples 4 --bert-prob 0.5 --gap-sentence-prob 0.3 --task-mask

``--json`` prints one JSON object per sample instead (the exact model input row: tokens, targets,
loss_mask, position_ids, sep, objective). Uses the same flags and code path as pretrain_glm.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_glm.config.data import DataConfig, add_data_args  # noqa: E402
from megatron_glm.data.blank_infilling import BlankInfillingCollator, InfilledSample  # noqa: E402
from megatron_glm.data.glm_dataset import SPLIT_NAMES, build_glm_datasets  # noqa: E402
from megatron_glm.data.tokenizers import tokenizer_from_spec  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_args(parser)
    g = parser.add_argument_group("show_samples")
    g.add_argument("--num-samples", type=int, default=4)
    g.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="samples per micro-batch (one objective each); default: --num-samples",
    )
    g.add_argument("--start", type=int, default=0, help="first sample index")
    g.add_argument("--dataset", choices=SPLIT_NAMES, default="train")
    g.add_argument("--json", action="store_true", help="one JSON object per sample")
    args = parser.parse_args(argv)
    if not args.data_path or not args.tokenizer_type:
        parser.error("--data-path and --tokenizer-type are required")
    return args


def describe(
    sample: InfilledSample, index: int, objective: str, tokenizer, input_length: int
) -> str:
    sep = sample.sep
    lines = [
        f"sample {index}: objective={objective} raw={sample.raw.size} sep={sep} "
        f"length={sample.tokens.size}/{input_length} loss_tokens={int(sample.loss_mask.sum())}",
        f"  Part A: {tokenizer.decode(sample.tokens[:sep])!r}",
    ]
    if sample.suffix:
        lines.append(
            f"  Part B (suffix, position {sep - 1}): {tokenizer.decode(sample.labels[sep:])!r}"
        )
        return "\n".join(lines)
    offset = sep
    for rank, j in enumerate(sample.order.tolist()):
        length = int(sample.span_lengths[j])
        position = int(sample.position_ids[0, offset])
        span = sample.labels[offset : offset + length]
        lines.append(
            f"  Part B span {rank} ({length} tokens, position {position}): "
            f"{tokenizer.decode(span)!r}"
        )
        offset += length + 1
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # notes (index building, splits left out) go to stderr; stdout holds only the samples
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    split = SPLIT_NAMES.index(args.dataset)
    wanted = [0, 0, 0]
    wanted[split] = args.start + args.num_samples
    try:
        config = DataConfig.from_args(args)
        tokenizer = tokenizer_from_spec(config.tokenizer_spec)
        # only the split shown: another split too short for a sample does not matter here
        dataset = build_glm_datasets(config, tokenizer, tuple(wanted), splits=(args.dataset,))[
            split
        ]
        collator = BlankInfillingCollator(
            config.infilling, tokenizer, config.input_length, config.seed
        )
    except (OSError, ValueError) as err:
        print(f"show_samples.py: {err}", file=sys.stderr)
        return 1
    micro = args.micro_batch_size or args.num_samples
    for first in range(args.start, args.start + args.num_samples, micro):
        indices = list(range(first, min(first + micro, args.start + args.num_samples)))
        raws = [dataset[i]["text"] for i in indices]
        objective, samples = collator.make_samples(raws, indices)
        batch = collator.pad(objective, samples)
        for row, (index, sample) in enumerate(zip(indices, samples)):
            if args.json:
                print(
                    json.dumps(
                        {
                            "index": index,
                            "objective": objective,
                            "tokens": batch["tokens"][row].tolist(),
                            "targets": batch["labels"][row].tolist(),
                            "loss_mask": batch["loss_mask"][row].tolist(),
                            "position_ids": batch["position_ids"][row].tolist(),
                            "sep": int(batch["sep"][row]),
                            "length": int(sample.tokens.size),
                        }
                    )
                )
            else:
                print(describe(sample, index, objective, tokenizer, config.input_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
