"""tools/show_samples.py end to end: as a user runs it (a subprocess, default flags) on a small corpus
preprocessed with --append-eod, and in-process with a BERT WordPiece tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config.data import BlankInfillingConfig, DataConfig
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder
from megatron_glm.data.tokenizers import build_tokenizer
from tests.data.test_glm_dataset import SP_ARGS, SP_MODEL, write_paragraphs
from tests.tools.cli import preprocess_jsonl, run_tool


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """600 generated paragraphs, preprocessed like the quickstart (--append-eod): with the default
    --split 949,50,1 the test split is one document, shorter than one raw sample of 512 tokens."""
    root: Path = tmp_path_factory.mktemp("show_samples")
    write_paragraphs(root / "corpus.jsonl", 600, seed=11)
    return preprocess_jsonl(root / "corpus.jsonl", root / "corpus", SP_ARGS, eod=True)


def test_default_flags_on_a_small_corpus(corpus):
    """Default flags (--split 949,50,1, --seq-length 512): the short test split it does not show
    is noted, not fatal; every sample has the model input length; no document end is doubled."""
    done = run_tool("tools/show_samples.py", "--data-path", corpus, *SP_ARGS, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.count("sample ") == 4 and done.stdout.count("Part A:") == 4
    assert "the test split (1 document," in done.stderr
    assert "not built: this run does not use it" in done.stderr
    length = DataConfig(seq_length=512).input_length
    assert f"/{length} " in done.stdout.splitlines()[0]

    done = run_tool(
        "tools/show_samples.py", "--data-path", corpus, *SP_ARGS, "--json", "--num-samples", "8"
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    assert len(rows) == 8
    for row in rows:
        tokens = np.array(row["tokens"][: row["length"]])
        assert len(row["tokens"]) == length and tokens[0] == tok.cls_id
        # spans never cover an [eos] and Part B carries it only before a [CLS]: two adjacent
        # [eos] anywhere would be a doubled document end
        pairs = (tokens[:-1] == tok.eos_id) & (tokens[1:] == tok.eos_id)
        assert not pairs.any(), row["index"]
    assert sum(int((np.array(r["tokens"]) == tok.eos_id).sum()) for r in rows) > 8


def test_a_split_too_short_to_show_is_one_clear_message(corpus):
    done = run_tool("tools/show_samples.py", "--data-path", corpus, *SP_ARGS, "--dataset", "test")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"show_samples.py: {corpus}: the test split (1 document, " in done.stderr
    assert "is shorter than one raw sample of 512 tokens (--seq-length 512)" in done.stderr
    assert "use a shorter --seq-length" in done.stderr


def test_show_samples_in_process_with_wordpiece(tmp_path, capsys):
    """The tool's main() with a tiny WordPiece vocabulary over a real indexed dataset."""
    from tools.show_samples import main

    words = [f"word{i}" for i in range(40)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"] + words) + "\n"
    )
    tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(vocab))
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "text")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for _ in range(30):
            sentences = [
                " ".join(rng.choice(words, int(rng.integers(3, 12)))) + " ." for _ in range(6)
            ]
            builder.add_document(tok.encode(" ".join(sentences)))
    common = [
        "--data-path",
        prefix,
        "--tokenizer-type",
        "BertWordPieceLowerCase",
        "--vocab-file",
        str(vocab),
        "--seq-length",
        "64",
        "--num-samples",
        "6",
        "--micro-batch-size",
        "2",
        "--split",
        "1,0,0",
        "--bert-prob",
        "0.4",
        "--gap-sentence-prob",
        "0.3",
        "--task-mask",
    ]
    length = DataConfig(
        seq_length=64,
        infilling=BlankInfillingConfig(bert_prob=0.4, gap_sentence_prob=0.3, task_mask=True),
    ).input_length
    assert main(common) == 0
    text = capsys.readouterr().out
    assert text.count("sample ") == 6 and "Part A:" in text and "Part B" in text
    assert main(common + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and {r["objective"] for r in rows} <= {"bert", "sentence", "gpt"}
    for r in rows:
        assert len(r["tokens"]) == len(r["targets"]) == len(r["loss_mask"]) == length
        assert len(r["position_ids"]) == 2 and r["tokens"][0] == tok.cls_id
        assert r["tokens"][r["length"] :] == [tok.pad_id] * (length - r["length"])
