"""Tokenize jsonl(.gz) documents into Megatron-compatible .bin/.idx files, one pair per json key
(``{output_prefix}_{key}_document``; ``_sentence`` with --split-sentences).

Example::

    python tools/preprocess_data.py --input data/python-docs-en.jsonl.gz \
        --output-prefix data/pydocs --json-keys text --append-eod --workers 2 \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model data/pydocs_sp8k.model
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.config.data import add_tokenizer_args, tokenizer_spec_from_args  # noqa: E402
from megatron_glm.data.preprocess import (  # noqa: E402
    ON_ERROR_CHOICES,
    PreprocessConfig,
    PreprocessError,
    preprocess_data,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input / output")
    g.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz file(s), in order")
    g.add_argument("--output-prefix", required=True, help="outputs: PREFIX_{key}_document.bin/.idx")
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to tokenize (each becomes its own dataset)",
    )
    g.add_argument(
        "--split-sentences",
        action="store_true",
        help="one sequence per sentence (rule-based split); documents recorded in document_indices",
    )
    g.add_argument("--append-eod", action="store_true", help="append the eos token to each doc")
    g.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="skip",
        help="bad lines (invalid JSON, missing key, non-string): skip and report them, or fail",
    )
    # exactly the tokenizer flags of a training recipe (pretrain_glm.py shares them)
    add_tokenizer_args(p, required=True)
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="encoder processes (the cores are shared between them as tokenizer threads)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        help="documents per tokenizer call (at most; see --batch-bytes)",
    )
    g.add_argument(
        "--batch-bytes",
        type=int,
        default=1 << 20,
        help="a batch also closes at this many bytes of input",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = PreprocessConfig(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer=tokenizer_spec_from_args(args),
            json_keys=tuple(args.json_keys),
            append_eod=args.append_eod,
            split_sentences=args.split_sentences,
            workers=args.workers,
            batch_size=args.batch_size,
            on_error=args.on_error,
            progress=not args.no_progress,
        )
        summary = preprocess_data(config)
    except (PreprocessError, ValueError, FileNotFoundError) as err:
        logging.getLogger("preprocess_data").error("%s", err)
        return 1
    if summary.num_bad_lines:
        logging.getLogger("preprocess_data").warning(
            "%d bad lines skipped, first: %s",
            summary.num_bad_lines,
            "; ".join(str(b) for b in summary.bad_lines[:5]),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
