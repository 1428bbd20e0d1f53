"""Train a sentencepiece tokenizer with GLM's command tokens reserved.

Writes PREFIX.model, PREFIX.vocab and PREFIX.json (which id is [pad] [eos] [CLS] [MASK] [sMASK]
[gMASK] [sop] [eop] [UNK] [SEP]; read and checked by the SentencePieceTokenizer). Bad input lines
(invalid JSON, a missing key, text that is not valid Unicode such as a lone surrogate "\ud800")
are skipped and reported as tools/preprocess_data.py does.

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
from collections import Counter
from collections.abc import Iterator, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.preprocess import (  # noqa: E402
    MAX_REPORTED_BAD_LINES,
    BadLine,
    iter_batches,
    parse_line,
)
from megatron_glm.data.sentencepiece import train_sentencepiece  # noqa: E402
from megatron_glm.data.tokenizers import build_tokenizer, is_valid_unicode  # noqa: E402

log = logging.getLogger("train_tokenizer")


def iter_training_texts(
    paths: Sequence[str], json_keys: Sequence[str], counts: Counter[str]
) -> Iterator[str]:
    """The texts of ``json_keys`` in the jsonl(.gz) files; a bad line is skipped, counted in
    ``counts["bad_lines"]`` and logged (the first MAX_REPORTED_BAD_LINES), as preprocess_data.py
    does.
    Text with a lone surrogate is valid JSON, but sentencepiece's trainer rejects it with an
    opaque pybind error, so it is a bad line too."""
    for batch in iter_batches(paths, 1024, 1 << 20):
        for offset, line in enumerate(batch.lines):
            parsed = parse_line(line, json_keys)
            if isinstance(parsed, dict) and not all(map(is_valid_unicode, parsed.values())):
                parsed = "text is not valid Unicode (lone surrogate escape)"
            if isinstance(parsed, str):
                counts["bad_lines"] += 1
                if counts["bad_lines"] <= MAX_REPORTED_BAD_LINES:
                    bad = BadLine(batch.path, batch.first_line + offset, parsed)
                    log.warning("skipping bad line %s", bad)
            elif parsed is not None:
                yield from parsed.values()


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
    start = time.perf_counter()
    counts: Counter[str] = Counter()
    try:
        model = train_sentencepiece(
            iter_training_texts(args.input, args.json_keys, counts),
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
    finally:
        if counts["bad_lines"]:
            log.warning("%d bad lines skipped", counts["bad_lines"])
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    log.info(
        "wrote %s (+ .vocab, .json) in %.1f s: %r", model, time.perf_counter() - start, tokenizer
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
