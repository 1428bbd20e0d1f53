"""Concatenate indexed datasets (same dtype) into one, sequences and documents in order.

Example::

    python tools/merge_datasets.py --input data/a_text_document data/b_text_document \
        --output-prefix data/ab_text_document
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_glm.data.indexed_dataset import merge_datasets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (no .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("merge_datasets")
    try:
        merged = merge_datasets(args.input, args.output_prefix)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 1
    log.info("wrote %r", merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
