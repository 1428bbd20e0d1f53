"""tools/train_tokenizer.py: writes PREFIX.model/.vocab/.json with the command tokens reserved."""

from __future__ import annotations

import json

from megatron_glm.data.tokenizers import COMMAND_TOKEN_NAMES, build_tokenizer
from tests.tools.cli import run_tool


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
