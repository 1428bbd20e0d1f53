"""tools/preprocess_data.py and tools/merge_datasets.py end to end on a slice of the bundled corpus:
worker-count independence, bad-line reporting, --on-error fail, atomic output on failure, merge, and
no empty dataset (a --json-keys typo, empty texts, an empty input) is ever written."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config.data import TokenizerSpec
from megatron_glm.data import preprocess
from megatron_glm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_glm.data.preprocess import (
    PreprocessConfig,
    PreprocessError,
    preprocess_data,
    split_into_sentences,
)
from megatron_glm.data.tokenizers import build_tokenizer
from tests.tools.cli import REPO, run_tool

CORPUS = REPO / "data" / "python-docs-en.jsonl.gz"
SP_MODEL = str(REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model")
SPEC = TokenizerSpec("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
NUM_DOCS = 60
# 1-based line numbers of the bad lines inserted into the slice, with what makes them bad.
BAD_LINES = {
    3: b'{"text": "unterminated\n',
    8: b'{"source": "no text key"}\n',
    12: b'{"text": 42}\n',
    20: b'["a", "list"]\n',
    25: b'{"text": "bad utf-8 \xff\xfe"}\n',
    31: b'{"text": "lone surrogate \\ud800 here"}\n',
    40: b'{"text": "two"} {"text": "objects"}\n',
}


@pytest.fixture(scope="module")
def corpus_docs() -> list[dict[str, str]]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(NUM_DOCS), f)]


@pytest.fixture(scope="module")
def clean_input(tmp_path_factory, corpus_docs) -> str:
    path = tmp_path_factory.mktemp("in") / "slice.jsonl.gz"
    with gzip.open(path, "wb") as f:
        for doc in corpus_docs:
            f.write(json.dumps(doc).encode() + b"\n")
        f.write(b'{"text": ""}\n')  # encodes to no tokens: dropped, not an error
    return str(path)


@pytest.fixture(scope="module")
def dirty_input(tmp_path_factory, corpus_docs) -> str:
    """The slice with bad lines at the BAD_LINES positions and a blank line (ignored)."""
    path = tmp_path_factory.mktemp("in") / "dirty.jsonl"
    docs = iter(corpus_docs)
    with open(path, "wb") as f:
        for line_no in range(1, NUM_DOCS + len(BAD_LINES) + 1):
            f.write(BAD_LINES.get(line_no) or json.dumps(next(docs)).encode() + b"\n")
        f.write(b"\n")
    return str(path)


def run(inputs: str | list[str], prefix: str, **kwargs) -> preprocess.PreprocessSummary:
    config = PreprocessConfig(
        inputs=inputs, output_prefix=prefix, tokenizer=SPEC, progress=False, **kwargs
    )
    return preprocess_data(config)


def read_bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_outputs_match_tokenizer_and_do_not_depend_on_workers(tmp_path, clean_input, corpus_docs):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    s1 = run(clean_input, str(tmp_path / "w1"), workers=1, append_eod=True, batch_size=16)
    s2 = run(clean_input, str(tmp_path / "w2"), workers=2, append_eod=True, batch_size=7)
    p1, p2 = s1.output_prefixes["text"], s2.output_prefixes["text"]
    assert p1 == str(tmp_path / "w1_text_document")
    assert read_bytes(p1) == read_bytes(p2)
    assert s1.num_documents == NUM_DOCS + 1 and s1.num_empty_documents == 1
    ds = IndexedDataset(p1)
    assert ds.dtype == np.uint16 and len(ds) == NUM_DOCS
    np.testing.assert_array_equal(ds.document_indices, np.arange(NUM_DOCS + 1))
    for i, doc in enumerate(corpus_docs):
        assert ds[i].tolist() == tok.encode(doc["text"]) + [tok.eos_id]
    assert s1.num_tokens["text"] == ds.num_tokens
    assert s1.documents_written == {"text": NUM_DOCS}


def test_split_sentences_and_multiple_keys(tmp_path, clean_input, corpus_docs):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    summary = run(
        clean_input,
        str(tmp_path / "s"),
        json_keys=("text", "source"),
        split_sentences=True,
        append_eod=True,
        workers=2,
        batch_size=9,
    )
    text = IndexedDataset(summary.output_prefixes["text"])
    source = IndexedDataset(summary.output_prefixes["source"])
    assert summary.output_prefixes["text"].endswith("s_text_sentence")
    assert text.num_documents == NUM_DOCS and len(text) > 3 * NUM_DOCS
    for d, doc in enumerate(corpus_docs):
        sentences = [s for s in split_into_sentences(doc["text"]) if tok.encode(s)]
        expected = [tok.encode(s) for s in sentences]
        expected[-1].append(tok.eos_id)
        assert [text[i].tolist() for i in text.document_sequences(d)] == expected
        assert source[source.document_sequences(d)[0]].tolist()[:-1] == tok.encode(doc["source"])


def test_split_into_sentences_preserves_text():
    text = "First one. Second? Third!  Fourth 中文。结束\n\nNew para\nsame para. e.g.x"
    pieces = split_into_sentences(text)
    assert "".join(pieces) == text
    assert pieces[:3] == ["First one. ", "Second? ", "Third!  "]
    assert pieces[-2:] == ["New para\nsame para. ", "e.g.x"]


def test_bad_lines_are_reported_with_line_numbers(tmp_path, dirty_input, clean_input):
    summary = run(dirty_input, str(tmp_path / "d"), batch_size=4, append_eod=True)
    assert summary.num_bad_lines == len(BAD_LINES)
    assert [b.line for b in summary.bad_lines] == sorted(BAD_LINES)
    reasons = {b.line: b.reason for b in summary.bad_lines}
    assert "invalid JSON" in reasons[3] and "missing key 'text'" in reasons[8]
    assert "holds int" in reasons[12] and "expected a JSON object" in reasons[20]
    assert "invalid JSON" in reasons[25] and "lone surrogate" in reasons[31]
    assert "extra data" in reasons[40]
    assert all(b.path == dirty_input for b in summary.bad_lines)
    # The good documents are exactly those of the clean run.
    clean = run(clean_input, str(tmp_path / "c"), batch_size=4, append_eod=True)
    assert read_bytes(summary.output_prefixes["text"]) == read_bytes(clean.output_prefixes["text"])


def test_on_error_fail_names_the_first_bad_line(tmp_path, dirty_input):
    with pytest.raises(PreprocessError, match=rf"{dirty_input}:3: invalid JSON"):
        run(dirty_input, str(tmp_path / "f"), on_error="fail", batch_size=2)
    assert os.listdir(tmp_path) == []


def test_cli_on_error_fail_exits_nonzero(tmp_path, dirty_input):
    prefix = str(tmp_path / "cli")
    cmd = [
        "tools/preprocess_data.py",
        "--input",
        dirty_input,
        "--output-prefix",
        prefix,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        SP_MODEL,
        "--no-progress",
    ]
    failed = run_tool(*cmd, "--on-error", "fail", timeout=120)
    assert failed.returncode != 0
    assert f"{dirty_input}:3: invalid JSON" in failed.stderr
    assert os.listdir(tmp_path) == []
    ok = run_tool(*cmd, "--workers", "2", "--append-eod", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "7 bad lines skipped" in ok.stderr and f"{dirty_input}:8: missing key" in ok.stderr
    assert IndexedDataset(prefix + "_text_document").num_documents == NUM_DOCS


def test_interrupted_run_leaves_no_final_files(tmp_path, clean_input, monkeypatch):
    calls = {"n": 0}
    original = IndexedDatasetBuilder.add_documents

    def failing_add_documents(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way through
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_documents", failing_add_documents)
    with pytest.raises(KeyboardInterrupt):
        run(clean_input, str(tmp_path / "x"), workers=2, batch_size=8)
    assert calls["n"] == 3
    assert os.listdir(tmp_path) == []  # neither final names nor temporaries


def test_merge_datasets_cli(tmp_path, clean_input, dirty_input):
    a = run(clean_input, str(tmp_path / "a"), append_eod=True).output_prefixes["text"]
    b = run(dirty_input, str(tmp_path / "b"), split_sentences=True).output_prefixes["text"]
    out = str(tmp_path / "ab")
    result = run_tool(
        "tools/merge_datasets.py", "--input", a, b, "--output-prefix", out, timeout=120
    )
    assert result.returncode == 0, result.stderr
    da, db, merged = IndexedDataset(a), IndexedDataset(b), IndexedDataset(out)
    assert len(merged) == len(da) + len(db)
    assert merged.num_documents == da.num_documents + db.num_documents
    for i in range(len(merged)):
        expected = da[i] if i < len(da) else db[i - len(da)]
        np.testing.assert_array_equal(merged[i], expected)
    np.testing.assert_array_equal(
        merged.document_indices,
        np.concatenate([da.document_indices, db.document_indices[1:] + len(da)]),
    )
    assert (
        Path(out + ".bin").read_bytes()
        == Path(a + ".bin").read_bytes() + Path(b + ".bin").read_bytes()
    )


def sp_cli(*args: str) -> list[str]:
    return [*args, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL]


def test_cli_refuses_to_write_an_empty_dataset(tmp_path, clean_input):
    """A --json-keys typo used to exit 0 with a 0-document dataset that failed only at training
    start: now exit 1, say which key matched nothing (and which keys the input has), write nothing."""
    out = tmp_path / "out"
    out.mkdir()
    for keys, unmatched in ((["txt"], "'txt'"), (["text", "body"], "'body'")):
        done = run_tool(
            "tools/preprocess_data.py",
            *sp_cli("--input", clean_input, "--output-prefix", str(out / "x"), "--no-progress"),
            "--json-keys",
            *keys,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert f"--json-keys {unmatched} matched nothing" in done.stderr  # only the culprit
        assert f"none of the first {NUM_DOCS + 1} JSON objects" in done.stderr
        assert "(their keys: 'source', 'text')" in done.stderr and "Traceback" not in done.stderr
        assert os.listdir(out) == []


def test_empty_texts_and_empty_input_are_errors(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": ""}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PreprocessError, match="of 2 documents read, 2 encoded to no tokens"):
        run(str(blank), str(out / "b"))
    with pytest.raises(PreprocessError, match="holds no JSON object in its first 1 lines"):
        run(str(empty), str(out / "e"))
    # a key that is empty in every document while the others are not: no empty 'source' dataset
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "some words", "source": ""}\n')
    with pytest.raises(PreprocessError, match="no documents for json key 'source'"):
        run(str(mixed), str(out / "m"), json_keys=("text", "source"))
    assert os.listdir(out) == []
