"""Preprocessing throughput: megatron_glm's batched pipeline vs a Megatron-style encoder.

Baseline (written here, modelled on Megatron-LM's ``tools/preprocess_data.py``): the main process
streams jsonl lines into ``multiprocessing.Pool.imap(encode, lines, chunksize=32)``; each worker
parses one line and calls the tokenizer once per document, returning Python lists of ids; the
main process converts each list to an array and writes it with ``IndexedDatasetBuilder``.

Ours: ``megatron_glm.data.preprocess.preprocess_data`` (batches of documents per C++/Rust batch
encode call, arrays in the output dtype back from the workers, bad-line checks, progress
accounting, atomic output all kept; the tqdm bar itself is disabled in both).

Same corpus, same tokenizer object type, same worker counts, same run; each configuration is
repeated and the best (least disturbed) time is kept. Outputs of both pipelines are compared
byte for byte. Usage::

    python benchmarks/bench_preprocess.py                      # sentencepiece + GPT-2-style BPE
    python benchmarks/bench_preprocess.py --tokenizers sentencepiece --repeats 5
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_glm.config.data import TokenizerSpec  # noqa: E402
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder, best_dtype  # noqa: E402
from megatron_glm.data.preprocess import PreprocessConfig, preprocess_data  # noqa: E402
from megatron_glm.data.sentencepiece import train_sentencepiece  # noqa: E402
from megatron_glm.data.tokenizers import tokenizer_from_spec  # noqa: E402

CORPUS = REPO / "data" / "python-docs-en.jsonl.gz"

# ---- Megatron-style baseline ---------------------------------------------------------------------

_BASELINE_TOKENIZER = None


class MegatronStyleEncoder:
    """One document per tokenizer call; results travel back as Python lists."""

    def __init__(self, spec: TokenizerSpec, json_keys: Sequence[str], append_eod: bool) -> None:
        self.spec, self.json_keys, self.append_eod = spec, list(json_keys), append_eod

    def initializer(self) -> None:
        global _BASELINE_TOKENIZER
        _BASELINE_TOKENIZER = tokenizer_from_spec(self.spec)

    def encode(self, json_line: str) -> tuple[dict[str, list[int]], dict[str, list[int]], int]:
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in self.json_keys:
            doc_ids = _BASELINE_TOKENIZER.encode(data[key])
            if doc_ids and self.append_eod:
                doc_ids.append(_BASELINE_TOKENIZER.eos_id)
            ids[key], lens[key] = doc_ids, [len(doc_ids)]
        return ids, lens, len(json_line)


def run_baseline(
    spec: TokenizerSpec,
    path: str,
    prefix: str,
    workers: int,
    vocab_size: int,
    append_eod: bool = True,
) -> None:
    encoder = MegatronStyleEncoder(spec, ["text"], append_eod)
    dtype = best_dtype(vocab_size)
    builder = IndexedDatasetBuilder(f"{prefix}_text_document", dtype)
    ctx = multiprocessing.get_context("fork")
    with (
        gzip.open(path, "rt", encoding="utf-8") as fin,
        ctx.Pool(workers, initializer=encoder.initializer) as pool,
    ):
        for ids, lens, _ in pool.imap(encoder.encode, fin, 32):
            if ids["text"]:  # (ours drops empty documents too: identical outputs)
                # Megatron-Core's builder converts each list with numpy.array(list, dtype).
                builder.add_document(np.array(ids["text"], dtype=dtype), lens["text"])
    builder.finalize()


def run_ours(spec: TokenizerSpec, path: str, prefix: str, workers: int) -> None:
    preprocess_data(
        PreprocessConfig(
            inputs=[path],
            output_prefix=prefix,
            tokenizer=spec,
            append_eod=True,
            workers=workers,
            progress=False,
        )
    )


# ---- set-up ------------------------------------------------------------------------------------


def make_corpus(workdir: Path, copies: int, granularity: str) -> tuple[str, list[str]]:
    """The bundled corpus ``copies`` times; with ``granularity='paragraph'`` every paragraph
    (blank-line separated) is its own document: same text, 110x more, 110x shorter documents."""
    with gzip.open(CORPUS, "rb") as f:
        texts = [json.loads(line)["text"] for line in f]
    if granularity == "paragraph":
        docs = [p for t in texts for p in t.split("\n\n") if p.strip()]
    else:
        docs = texts
    path = workdir / f"corpus_{granularity}.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": d}).encode() + b"\n" for d in docs)
    return str(path), docs


def sentencepiece_spec(workdir: Path, texts: list[str], model: str | None) -> TokenizerSpec:
    if model is None:
        start = time.perf_counter()
        model = train_sentencepiece(
            texts, str(workdir / "sp8k"), vocab_size=8000, max_sentences=60_000
        )
        print(f"# trained sentencepiece unigram 8000 in {time.perf_counter() - start:.1f} s")
    return TokenizerSpec("SentencePieceTokenizer", tokenizer_model=model)


def _train_byte_bpe(texts: list[str], workdir: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.model.save(workdir, "bpe8k")


def gpt2_style_spec(workdir: Path, texts: list[str]) -> TokenizerSpec:
    """A byte-level BPE (GPT-2's scheme) trained on the corpus: vocab.json + merges.txt.

    Trained in a separate process: Rust ``tokenizers`` disables its thread pool in processes
    forked after the parent used it, which would handicap the pipelines' forked workers."""
    proc = multiprocessing.get_context("spawn").Process(
        target=_train_byte_bpe, args=(texts, str(workdir))
    )
    proc.start()
    proc.join()
    assert proc.exitcode == 0, "BPE training failed"
    return TokenizerSpec(
        "GPT2BPETokenizer",
        vocab_file=str(workdir / "bpe8k-vocab.json"),
        merge_file=str(workdir / "bpe8k-merges.txt"),
    )


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""

    def cpu() -> float:
        own, kids = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    cpu0, start = cpu(), time.perf_counter()
    fn(*args)
    return time.perf_counter() - start, cpu() - cpu0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--tokenizers",
        nargs="+",
        default=["sentencepiece", "gpt2bpe"],
        choices=["sentencepiece", "gpt2bpe"],
    )
    p.add_argument(
        "--granularity",
        nargs="+",
        default=["document", "paragraph"],
        choices=["document", "paragraph"],
        help="one jsonl line per document of the bundled corpus, or per paragraph of it",
    )
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--corpus-copies", type=int, default=1, help="the bundled corpus repeated")
    p.add_argument("--sp-model", help="an existing sentencepiece model (else one is trained)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        corpora = {g: make_corpus(workdir, args.corpus_copies, g) for g in args.granularity}
        texts = next(iter(corpora.values()))[1]
        specs = {}
        if "sentencepiece" in args.tokenizers:
            specs["sentencepiece unigram 8k"] = sentencepiece_spec(workdir, texts, args.sp_model)
        if "gpt2bpe" in args.tokenizers:
            specs["GPT-2-style byte BPE 8k"] = gpt2_style_spec(workdir, texts)
        print(
            f"# corpus: {CORPUS.name} x{args.corpus_copies}; "
            + "; ".join(f"{g}: {len(c[1]) * args.corpus_copies} docs" for g, c in corpora.items())
            + f"; {len(os.sched_getaffinity(0))} CPUs; best of {args.repeats}"
        )
        print(
            "| tokenizer | docs | workers | tokens | baseline tok/s | ours tok/s | wall ratio "
            "| CPU-s baseline / ours |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, spec in specs.items():
            vocab_size = tokenizer_from_spec(spec).vocab_size
            itemsize = best_dtype(vocab_size).itemsize
            for granularity, (corpus, _) in corpora.items():
                for workers in args.workers:
                    base, ours = [], []
                    for r in range(args.repeats):
                        b, o = str(workdir / f"base{r}"), str(workdir / f"ours{r}")
                        base.append(timed(run_baseline, spec, corpus, b, workers, vocab_size))
                        ours.append(timed(run_ours, spec, corpus, o, workers))
                        for suffix in (".bin", ".idx"):
                            same = (
                                Path(b + "_text_document" + suffix).read_bytes()
                                == Path(o + "_text_document" + suffix).read_bytes()
                            )
                            assert same, f"outputs differ ({suffix})"
                    tokens = os.path.getsize(o + "_text_document.bin") // itemsize
                    base_wall, ours_wall = min(t for t, _ in base), min(t for t, _ in ours)
                    base_cpu, ours_cpu = min(c for _, c in base), min(c for _, c in ours)
                    row = {
                        "tokenizer": name,
                        "granularity": granularity,
                        "workers": workers,
                        "tokens": tokens,
                        "baseline_wall_s": base_wall,
                        "ours_wall_s": ours_wall,
                        "ratio": base_wall / ours_wall,
                        "baseline_cpu_s": base_cpu,
                        "ours_cpu_s": ours_cpu,
                    }
                    rows.append(row)
                    print(
                        f"| {name} | {granularity} | {workers} | {tokens:,} | "
                        f"{tokens / base_wall:,.0f} | {tokens / ours_wall:,.0f} | "
                        f"{row['ratio']:.2f}x | {base_cpu:.2f} / {ours_cpu:.2f} |",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
