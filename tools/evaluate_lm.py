"""Zero-shot evaluation of a GLM checkpoint: perplexity of a text file, or LAMBADA accuracy.

    python tools/evaluate_lm.py --task perplexity --valid-data wiki.test.txt \\
        --load-pretrained runs/glm --seq-length 512 --overlapping-eval 256 \\
        --tokenizer-type GPT2BPETokenizer --save runs/eval-wiki
    python tools/evaluate_lm.py --task lambada --valid-data lambada_test.jsonl \\
        --load-pretrained runs/glm --unidirectional ...

Windows, stride and context, and the bidirectional / unidirectional layouts are defined in
``megatron_glm.tasks.zero_shot`` and docs/finetuning.md#zero-shot-evaluation. One process, the
whole model (TP 1) on the GPU when there is one. The metrics go to the log and, with ``--save``,
to ``<save>/results.json`` (``{"task", "split", "metrics"}``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_glm.config.data import add_tokenizer_args, tokenizer_spec_from_args  # noqa: E402

logger = logging.getLogger("evaluate_lm")

TASKS = ("perplexity", "lambada")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate_lm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--valid-data", required=True, help="text file (perplexity) or jsonl")
    p.add_argument("--load-pretrained", required=True, help="a checkpoint of any form")
    p.add_argument(
        "--seq-length",
        type=int,
        default=512,
        help="perplexity: tokens per window; lambada: longest row (context is cut to fit)",
    )
    p.add_argument(
        "--overlapping-eval",
        type=int,
        default=None,
        help="perplexity: the window stride, tokens scored per window after the first "
        "(default --seq-length: no overlap)",
    )
    p.add_argument(
        "--unidirectional",
        action="store_true",
        help="context as a left-to-right prefix in Part B instead of Part A",
    )
    p.add_argument("--task-mask", action="store_true", help="the blank is [gMASK], not [MASK]")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--save", default=None, help="write results.json here")
    add_tokenizer_args(p, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    args = build_parser().parse_args(argv)

    import torch

    from megatron_glm import GLMModel
    from megatron_glm.data.tokenizers import tokenizer_from_spec
    from megatron_glm.tasks import zero_shot
    from megatron_glm.tasks.data import TaskDataError, Truncations
    from megatron_glm.tasks.finetune import write_results

    tokenizer = tokenizer_from_spec(tokenizer_spec_from_args(args))
    stride = args.overlapping_eval or args.seq_length
    blank = tokenizer.gmask_id if args.task_mask else tokenizer.mask_id
    truncations = Truncations("test")
    try:
        if args.task == "perplexity":
            rows = zero_shot.perplexity_rows(
                zero_shot.read_documents(args.valid_data, tokenizer),
                args.seq_length,
                stride,
                tokenizer,
                unidirectional=args.unidirectional,
                blank=blank,
            )
        else:
            rows = zero_shot.lambada_rows(
                zero_shot.read_lambada(args.valid_data, tokenizer),
                args.seq_length,
                tokenizer,
                unidirectional=args.unidirectional,
                blank=blank,
                truncations=truncations,
            )
    except (TaskDataError, ValueError, OSError) as err:
        print(f"evaluate_lm.py: {err}", file=sys.stderr)
        return 2
    model = GLMModel.from_pretrained(args.load_pretrained)
    longest = max(r.tokens.size for r in rows)
    if longest > model.config.max_sequence_length:
        print(
            f"evaluate_lm.py: rows of {longest} tokens exceed the model's "
            f"max_sequence_length {model.config.max_sequence_length}: lower --seq-length",
            file=sys.stderr,
        )
        return 2
    if torch.cuda.is_available():
        model = model.cuda()
    scores = zero_shot.score_rows(model, rows, args.eval_batch_size, tokenizer.pad_id)
    if args.task == "perplexity":
        metrics = zero_shot.perplexity_metrics(scores)
    else:
        metrics = zero_shot.lambada_metrics(scores)
    report = truncations.report(len(rows))
    if report:
        logger.warning("%s", report)
    mode = "unidirectional" if args.unidirectional else "bidirectional"
    logger.info("%s (%s): %s", args.task, mode, metrics)
    if args.save:
        path = write_results(
            args.save, args.task, "test", metrics, mode=mode, truncated=truncations.count
        )
        logger.info("results written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
