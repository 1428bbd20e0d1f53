"""tools/train_tokenizer.py: writes PREFIX.model/.vocab/.json with the command tokens reserved,
and skips bad input lines (invalid JSON, lone surrogates) with their file and line."""

from __future__ import annotations

import gzip
import json

from megatron_glm.data.tokenizers import COMMAND_TOKEN_NAMES, build_tokenizer
from tests.tools.cli import REPO, run_tool


def test_train_tokenizer_cli(tmp_path):
    prefix = tmp_path / "tok" / "sp"
    result = run_tool(
        "tools/train_tokenizer.py",
        "--input",
        "data/python-docs-en.jsonl.gz",
        "--json-keys",
        "text",
        "--vocab-size",
        "700",
        "--model-type",
        "bpe",
        "--max-sentences",
        "4000",
        "--output-prefix",
        str(prefix),
    )
    assert result.returncode == 0, result.stderr
    for suffix in (".model", ".vocab", ".json"):
        assert (tmp_path / "tok" / f"sp{suffix}").is_file()
    meta = json.loads((tmp_path / "tok" / "sp.json").read_text(encoding="utf-8"))
    assert meta["trainer"]["num_lines"] == 4000 and meta["vocab_size"] == 700
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(prefix) + ".model")
    assert set(tok.command_tokens) == set(COMMAND_TOKEN_NAMES)
    text = "Return the *absolute* path.\n    >>> os.path.abspath('x')\n"
    assert tok.decode(tok.encode(text)) == text


def test_train_tokenizer_rejects_too_small_vocab(tmp_path):
    result = run_tool(
        "tools/train_tokenizer.py",
        "--input",
        "data/python-docs-en.jsonl.gz",
        "--vocab-size",
        "50",
        "--output-prefix",
        str(tmp_path / "sp"),
    )
    assert result.returncode == 1
    assert "vocab_size 50 must exceed" in result.stderr
    assert not (tmp_path / "sp.model").exists()


def test_train_tokenizer_skips_and_counts_bad_lines(tmp_path):
    """A JSON line holding a lone surrogate ("\\ud800" is valid JSON) crashed the trainer with an
    opaque pybind error; it is now skipped and reported with its file and line, like a line of
    invalid JSON, and the model is trained on the rest."""
    with gzip.open(REPO / "data" / "python-docs-en.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(60), f)]
    lines.insert(3, '{"text": "broken \\ud800 surrogate"}')
    lines.insert(10, '{"text": "cut off')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_tool(
        "tools/train_tokenizer.py",
        "--input",
        str(corpus),
        "--vocab-size",
        "600",
        "--model-type",
        "bpe",
        "--max-sentences",
        "3000",
        "--output-prefix",
        str(tmp_path / "sp"),
    )
    assert result.returncode == 0, result.stderr
    assert f"skipping bad line {corpus}:4: text is not valid Unicode" in result.stderr
    assert f"skipping bad line {corpus}:11: invalid JSON" in result.stderr
    assert "2 bad lines skipped" in result.stderr
    meta = json.loads((tmp_path / "sp.json").read_text(encoding="utf-8"))
    assert meta["vocab_size"] == 600 and meta["trainer"]["num_invalid_texts"] == 0
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert tok.decode(tok.encode("os.path.join(a, b)\n")) == "os.path.join(a, b)\n"
