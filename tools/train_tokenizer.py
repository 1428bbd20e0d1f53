"""Train a sentencepiece tokenizer with GLM's command tokens reserved.

Writes PREFIX.model, PREFIX.vocab and PREFIX.json (which id is [pad] [eos] [CLS] [MASK] [sMASK]
[gMASK] [sop] [eop] [UNK] [SEP]; read and checked by the SentencePieceTokenizer).

Example (about 30 s on 2 cores for the bundled corpus)::

    python tools/train_tokenizer.py --input data/python-docs-en.jsonl.gz --json-keys text \
        --vocab-size 8000 --output-prefix data/pydocs_sp8k
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.preprocess import iter_texts  # noqa: E402
from megatron_glm.data.tokenizers import build_tokenizer, train_sentencepiece  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl or jsonl.gz file(s)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=200_000,
        help="train on at most this many lines (a seeded sample): bounds the training time",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="unknown characters become [UNK] instead of UTF-8 byte pieces",
    )
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("train_tokenizer")
    start = time.perf_counter()
    try:
        model = train_sentencepiece(
            iter_texts(args.input, args.json_keys),
            args.output_prefix,
            args.vocab_size,
            model_type=args.model_type,
            max_sentences=args.max_sentences,
            character_coverage=args.character_coverage,
            byte_fallback=not args.no_byte_fallback,
            num_threads=args.num_threads,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 1
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    log.info(
        "wrote %s (+ .vocab, .json) in %.1f s: %r", model, time.perf_counter() - start, tokenizer
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
