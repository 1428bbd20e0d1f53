"""Offline preprocessing: jsonl(.gz) documents -> Megatron ``.bin``/``.idx`` token files.

The speed comes from batching: the main process reads raw lines and ships *batches* of them to
worker processes; each worker parses the JSON, encodes the whole batch with one call into the
tokenizer's C++/Rust batch encoder (multi-threaded there), and sends back one contiguous token
array per json key, already in the output dtype. The main process only appends those arrays to
the builders. A Megatron-style pipeline instead encodes one document per call and moves Python
lists of ints between processes (see ``benchmarks/bench_preprocess.py`` for the comparison).

Output is deterministic: batches are consumed in input order whatever the number of workers.
Output files carry temporary names until every batch is written; an error or interrupt removes
them (see ``IndexedDatasetBuilder``).
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from typing import Any

import numpy as np

from megatron_glm.config.data import TokenizerSpec
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron_glm.data.tokenizers import (
    is_valid_unicode,
    tokenizer_from_spec,
    write_dataset_tokenizer,
)

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("skip", "fail")
MAX_REPORTED_BAD_LINES = 20
# Lines re-read to explain an output without documents (a --json-keys typo, empty texts, ...).
DIAGNOSED_LINES = 10_000

# A sentence ends after . ! ? (or a CJK stop) followed by whitespace, or at a blank line. The
# whitespace stays with the sentence before it, so the sentences concatenate to the document.
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n\s*\n\s*")


class PreprocessError(ValueError):
    """A bad input line under ``on_error='fail'`` (the message names file and line), or an output
    that would hold no document (the message says which json key and why)."""


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: TokenizerSpec
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    split_sentences: bool = False
    workers: int = 1
    batch_size: int = 1024  # documents per batch (per tokenizer call) at most
    batch_bytes: int = 1 << 20  # a batch also closes at this much raw jsonl
    on_error: str = "skip"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ValueError("no input file given")
        for path in self.inputs:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"input file {path} does not exist")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.batch_size < 1 or self.batch_bytes < 1:
            raise ValueError(
                f"batch_size and batch_bytes must be >= 1, got {self.batch_size} "
                f"and {self.batch_bytes}"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {self.on_error!r}")
        if not self.json_keys:
            raise ValueError("json_keys is empty")

    def output_prefix_for(self, key: str) -> str:
        level = "sentence" if self.split_sentences else "document"
        return f"{self.output_prefix}_{key}_{level}"


@dataclass
class BadLine:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class PreprocessSummary:
    output_prefixes: dict[str, str]
    num_documents: int = 0
    num_empty_documents: int = 0
    num_tokens: dict[str, int] = field(default_factory=dict)
    documents_written: dict[str, int] = field(default_factory=dict)  # key -> its output's documents
    num_bytes: int = 0
    num_bad_lines: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)  # the first MAX_REPORTED_BAD_LINES
    seconds: float = 0.0


@dataclass
class _Batch:
    path: str
    first_line: int  # 1-based line number of lines[0]
    lines: list[bytes]


@dataclass
class _EncodedBatch:
    tokens: dict[str, np.ndarray]  # key -> all tokens of the batch, output dtype
    sequence_lengths: dict[str, np.ndarray]
    document_ends: dict[str, np.ndarray]  # key -> cumulative sequence count at each doc end
    num_documents: int
    num_empty_documents: int
    num_bytes: int
    bad_lines: list[BadLine]


def split_into_sentences(text: str) -> list[str]:
    """Cheap rule-based sentence split; ``"".join(result) == text``."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def open_input(path: str) -> Any:
    """Binary line iterator over a ``.jsonl`` or ``.jsonl.gz`` file."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def iter_batches(paths: Sequence[str], batch_size: int, batch_bytes: int) -> Iterator[_Batch]:
    """Consecutive lines, ``batch_size`` lines or ``batch_bytes`` bytes at most per batch."""
    for path in paths:
        with open_input(path) as f:
            lines: list[bytes] = []
            first, nbytes = 1, 0
            for line_no, line in enumerate(f, start=1):
                if not lines:
                    first = line_no
                lines.append(line)
                nbytes += len(line)
                if len(lines) >= batch_size or nbytes >= batch_bytes:
                    yield _Batch(path, first, lines)
                    lines, nbytes = [], 0
            if lines:
                yield _Batch(path, first, lines)


_JSON_DECODER = json.JSONDecoder()


def parse_line(line: bytes, json_keys: Sequence[str]) -> dict[str, str] | str | None:
    """The texts of ``json_keys`` in one jsonl line; None for a blank line; an error message
    (str) for a bad one."""
    # raw_decode on the stripped text is json.loads minus its per-call wrappers (encoding
    # detection, trailing-whitespace scan): a third of the parse cost for short documents.
    try:
        text = line.decode("utf-8").strip().lstrip("\ufeff")  # tolerate a byte-order mark
        if not text:
            return None
        obj, end = _JSON_DECODER.raw_decode(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"invalid JSON ({err})"
    if end != len(text):
        return f"invalid JSON (extra data after column {end})"
    if type(obj) is not dict:
        return f"expected a JSON object, got {type(obj).__name__}"
    texts = {}
    for key in json_keys:
        value = obj.get(key)
        if type(value) is not str:
            if key not in obj:
                return f"missing key {key!r}"
            return f"key {key!r} holds {type(value).__name__}, not a string"
        texts[key] = value
    return texts


class BatchEncoder:
    """Encodes batches of raw jsonl lines; one per worker process (or in-process)."""

    def __init__(self, config: PreprocessConfig, num_threads: int) -> None:
        self.config = config
        # Rust tokenizers size their pool from this variable on first use.
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        self.tokenizer = tokenizer_from_spec(config.tokenizer)
        if hasattr(self.tokenizer, "num_threads"):
            self.tokenizer.num_threads = num_threads
        self.dtype = best_dtype(self.tokenizer.vocab_size)

    def encode(self, batch: _Batch) -> _EncodedBatch:
        cfg = self.config
        docs: list[dict[str, str]] = []
        doc_lines: list[int] = []
        doc_bytes: list[int] = []
        bad: list[BadLine] = []
        for offset, line in enumerate(batch.lines):
            parsed = parse_line(line, cfg.json_keys)
            if isinstance(parsed, str):
                bad.append(BadLine(batch.path, batch.first_line + offset, parsed))
            elif parsed is not None:
                docs.append(parsed)
                doc_lines.append(batch.first_line + offset)
                doc_bytes.append(len(line))
        try:
            encoded = [self._encode_key([d[key] for d in docs]) for key in cfg.json_keys]
        except Exception:
            # Valid JSON can still hold text no tokenizer accepts (a lone UTF-16 surrogate such
            # as "\ud800"); find those documents, report them as bad lines and encode the rest.
            unencodable = [
                i for i, d in enumerate(docs) if not all(map(is_valid_unicode, d.values()))
            ]
            if not unencodable:
                raise
            for i in unencodable:
                bad.append(
                    BadLine(
                        batch.path,
                        doc_lines[i],
                        "text is not valid Unicode (lone surrogate escape)",
                    )
                )
                doc_bytes[i] = 0
            drop = set(unencodable)
            docs = [d for i, d in enumerate(docs) if i not in drop]
            bad.sort(key=lambda b: b.line)
            encoded = [self._encode_key([d[key] for d in docs]) for key in cfg.json_keys]
        result = _EncodedBatch({}, {}, {}, len(docs), 0, sum(doc_bytes), bad)
        empty = np.zeros(len(docs), dtype=bool)
        for key, (tokens, lengths, ends, key_empty) in zip(cfg.json_keys, encoded):
            result.tokens[key], result.sequence_lengths[key] = tokens, lengths
            result.document_ends[key] = ends
            empty |= key_empty
        result.num_empty_documents = int(empty.sum())
        return result

    def _encode_key(
        self, texts: list[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All texts of one key: (tokens, sequence lengths, document ends, empty-doc flags).
        Documents that encode to no tokens are dropped (no empty documents in the output)."""
        if self.config.split_sentences:
            sentences = [split_into_sentences(t) for t in texts]
            flat = [s for doc in sentences for s in doc]
            counts = np.array([len(doc) for doc in sentences], dtype=np.int64)
        else:
            flat, counts = texts, np.ones(len(texts), dtype=np.int64)
        arrays = self.tokenizer.encode_batch_arrays(flat) if flat else []
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        # A sequence that encodes to nothing (an empty string) is dropped, as Megatron does.
        kept = lengths > 0
        doc_of_seq = np.repeat(np.arange(len(texts)), counts)
        seqs_per_doc = np.bincount(doc_of_seq[kept], minlength=len(texts))
        empty_doc = seqs_per_doc == 0
        pieces = [a for a, k in zip(arrays, kept) if k]
        lengths = lengths[kept]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if self.config.append_eod and pieces:
            # eod closes each document: right after the last token of its last kept sequence.
            last_seq = np.cumsum(seqs_per_doc)[~empty_doc] - 1
            tokens = np.insert(tokens, np.cumsum(lengths)[last_seq], self.tokenizer.eos_id)
            lengths[last_seq] += 1
        assert tokens.size == int(lengths.sum())
        tokens = tokens.astype(self.dtype, copy=False)
        ends = np.cumsum(seqs_per_doc[~empty_doc])
        return tokens, lengths, ends, empty_doc


_WORKER_ENCODER: BatchEncoder | None = None


def _init_worker(config: PreprocessConfig, num_threads: int) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = BatchEncoder(config, num_threads)


def _encode_in_worker(batch: _Batch) -> _EncodedBatch:
    assert _WORKER_ENCODER is not None, "worker not initialised"
    return _WORKER_ENCODER.encode(batch)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def preprocess_data(config: PreprocessConfig) -> PreprocessSummary:
    """Tokenize ``config.inputs`` into one ``.bin``/``.idx`` pair per json key."""
    from tqdm import tqdm

    start = time.perf_counter()
    num_threads = max(1, available_cpus() // config.workers)
    tokenizer = tokenizer_from_spec(config.tokenizer)
    dtype = best_dtype(tokenizer.vocab_size)
    prefixes = {key: config.output_prefix_for(key) for key in config.json_keys}
    summary = PreprocessSummary(
        prefixes,
        num_tokens=dict.fromkeys(config.json_keys, 0),
        documents_written=dict.fromkeys(config.json_keys, 0),
    )
    builders = {key: IndexedDatasetBuilder(p, dtype) for key, p in prefixes.items()}
    # fork: workers start in milliseconds and inherit the imported modules; the parent never
    # encodes, so the tokenizers' thread pools are first created inside the workers.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(config.workers, initializer=_init_worker, initargs=(config, num_threads))
    bar = tqdm(unit="docs", disable=not config.progress, desc="preprocess", smoothing=0.1)
    # A bounded window of batches in flight, consumed in submission order: deterministic output
    # and bounded memory (Pool.imap would read the whole input ahead into its task queue).
    batches = iter_batches(config.inputs, config.batch_size, config.batch_bytes)
    pending: deque[AsyncResult] = deque()

    def submit() -> None:
        batch = next(batches, None)
        if batch is not None:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))

    try:
        for _ in range(2 * config.workers + 2):
            submit()
        while pending:
            encoded = pending.popleft().get()
            submit()
            if encoded.bad_lines:
                if config.on_error == "fail":
                    raise PreprocessError(
                        f"bad input line {encoded.bad_lines[0]} (--on-error fail)"
                    )
                for bad in encoded.bad_lines:
                    if len(summary.bad_lines) < MAX_REPORTED_BAD_LINES:
                        summary.bad_lines.append(bad)
                        logger.warning("skipping bad line %s", bad)
                summary.num_bad_lines += len(encoded.bad_lines)
            for key, builder in builders.items():
                builder.add_documents(
                    encoded.tokens[key], encoded.sequence_lengths[key], encoded.document_ends[key]
                )
                summary.num_tokens[key] += int(encoded.tokens[key].size)
                summary.documents_written[key] += int(encoded.document_ends[key].size)
            summary.num_documents += encoded.num_documents
            summary.num_empty_documents += encoded.num_empty_documents
            summary.num_bytes += encoded.num_bytes
            bar.update(encoded.num_documents)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{summary.num_bytes / elapsed / 1e6:.1f} MB/s", refresh=False)
        # An empty dataset would only fail later, at training start: refuse it here (the
        # builders are aborted below, so nothing is left behind).
        empty = [key for key, count in summary.documents_written.items() if count == 0]
        if empty:
            raise PreprocessError(_no_documents_message(config, summary, empty))
        for builder in builders.values():
            builder.finalize()
        for prefix in prefixes.values():
            write_dataset_tokenizer(prefix, tokenizer, config.tokenizer)
    except BaseException:
        pool.terminate()
        for builder in builders.values():
            builder.abort()
        raise
    finally:
        bar.close()
        pool.close()
        pool.join()
    summary.seconds = time.perf_counter() - start
    tokens = sum(summary.num_tokens.values())
    logger.info(
        "preprocessed %d documents (%.1f MB) into %d tokens in %.1f s (%.0f docs/s, %.2f MB/s, "
        "%.0f tokens/s); %d bad lines skipped; %d empty documents dropped; outputs: %s",
        summary.num_documents,
        summary.num_bytes / 1e6,
        tokens,
        summary.seconds,
        summary.num_documents / summary.seconds,
        summary.num_bytes / summary.seconds / 1e6,
        tokens / summary.seconds,
        summary.num_bad_lines,
        summary.num_empty_documents,
        ", ".join(prefixes.values()),
    )
    return summary


def _no_documents_message(
    config: PreprocessConfig, summary: PreprocessSummary, empty_keys: list[str]
) -> str:
    """Why the outputs of ``empty_keys`` got no document, from the run's counts and the first
    ``DIAGNOSED_LINES`` lines of the input (which keys their JSON objects hold)."""
    head = (
        f"no documents for json key{'s' * (len(empty_keys) > 1)} "
        f"{', '.join(map(repr, empty_keys))}; nothing written to {config.output_prefix}_*: "
    )
    holding = dict.fromkeys(config.json_keys, 0)  # key -> objects with a string under it
    found: set[str] = set()
    lines = objects = 0
    for batch in iter_batches(config.inputs, 1024, 1 << 20):
        for line in batch.lines:
            lines += 1
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                objects += 1
                found.update(obj)
                for key in holding:
                    holding[key] += isinstance(obj.get(key), str)
        if lines >= DIAGNOSED_LINES:
            break
    if objects == 0:
        first_bad = f" (first: {summary.bad_lines[0]})" if summary.bad_lines else ""
        return head + (
            f"the input ({', '.join(config.inputs)}) holds no JSON object in its first "
            f"{lines} lines{first_bad}"
        )
    unmatched = [key for key in config.json_keys if holding[key] == 0]
    if unmatched:
        return head + (
            f"--json-keys {', '.join(map(repr, unmatched))} matched nothing: none of the first "
            f"{objects} JSON objects of the input has a string under "
            f"{'that key' if len(unmatched) == 1 else 'those keys'} (their keys: "
            f"{', '.join(map(repr, sorted(found)))})"
        )
    return head + (
        f"of {summary.num_documents} documents read, {summary.num_empty_documents} encoded to no "
        f"tokens and {summary.num_bad_lines} lines were bad"
        + (f" (first: {summary.bad_lines[0]})" if summary.bad_lines else "")
    )


def iter_texts(paths: Sequence[str], json_keys: Sequence[str]) -> Iterator[str]:
    """Every text of ``json_keys`` in the jsonl(.gz) files (bad lines skipped with a warning);
    the input of tokenizer training."""
    num_bad = 0
    for batch in iter_batches(paths, 1024, 1 << 20):
        for offset, line in enumerate(batch.lines):
            parsed = parse_line(line, json_keys)
            if isinstance(parsed, str):
                num_bad += 1
                if num_bad <= MAX_REPORTED_BAD_LINES:
                    logger.warning(
                        "skipping bad line %s:%d: %s", batch.path, batch.first_line + offset, parsed
                    )
            elif parsed is not None:
                yield from parsed.values()
    if num_bad:
        logger.warning("%d bad lines skipped", num_bad)
