"""Tokenizers: official GLM command-token ids (GPT-2 BPE, BERT WordPiece), sentencepiece reserved
ids and metadata validation, batch encode == single encode, sentence-end mask, training."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.data.tokenizers import (
    COMMAND_TOKEN_NAMES,
    build_tokenizer,
    train_sentencepiece,
)

REPO = Path(__file__).resolve().parents[2]
SP_ASSET = REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model"
CORPUS = REPO / "data" / "python-docs-en.jsonl.gz"

TEXTS = [
    "Hello world. This is a test!",
    "def f(x):\n    return x  # indented code\n",
    "",
    "one [MASK] two [gMASK] three",
    "Ünïcode und 中文。结束？",
]


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory) -> tuple[str, str]:
    """A synthetic GPT-2-shaped vocabulary: 256 byte symbols, a few merges, filler entries up to
    50256, then <|endoftext|> at 50256 (50257 entries, like GPT-2's)."""
    root = tmp_path_factory.mktemp("gpt2")
    alphabet = list(gpt2_byte_to_unicode().values())
    merges = [
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("hell", "o"),
        ("Ġ", "w"),
        ("o", "r"),
        ("Ġw", "or"),
        ("l", "d"),
        ("Ġwor", "ld"),
    ]
    vocab = {s: i for i, s in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    while len(vocab) < 50256:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    vocab["<|endoftext|>"] = 50256
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (root / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return str(root / "vocab.json"), str(root / "merges.txt")


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory) -> str:
    """A synthetic 30522-line BERT vocabulary with the special tokens where BERT has them."""
    root = tmp_path_factory.mktemp("bert")
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [
        ".",
        ",",
        "!",
        "?",
        "a",
        "the",
        "hello",
        "world",
        "##s",
        "##ing",
        "test",
        "is",
        "this",
        "one",
        "two",
        "three",
        "hel",
        "##lo",
        "Hello",
        "中",
        "文",
        "。",
    ]
    tokens += [f"filler{i}" for i in range(30522 - len(tokens))]
    assert len(tokens) == 30522
    path = root / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return str(path)


def check_common_api(tok) -> None:
    ids = {name: tok.command_tokens[name] for name in COMMAND_TOKEN_NAMES}
    assert ids["pad"] == tok.pad_id and ids["eos"] == tok.eos_id and ids["cls"] == tok.cls_id
    assert ids["mask"] == tok.mask_id and ids["smask"] == tok.smask_id
    assert ids["gmask"] == tok.gmask_id and ids["sop"] == tok.sop_id and ids["eop"] == tok.eop_id
    assert ids["unk"] == tok.unk_id and ids["sep"] == tok.sep_id
    singles = [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS) == singles
    arrays = tok.encode_batch_arrays(TEXTS)
    assert [a.tolist() for a in arrays] == singles
    assert all(max(s, default=0) < tok.vocab_size for s in singles)
    # Command-token texts in the input map to the command ids.
    assert tok.mask_id in singles[3] and tok.gmask_id in singles[3]
    mask = tok.sentence_end_mask()
    assert mask.shape == (tok.vocab_size,) and mask.dtype == bool
    assert not mask[list(ids.values())].any()
    json.dumps(tok.metadata())
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_batch(TEXTS) == singles and clone.command_tokens == tok.command_tokens


def test_gpt2_official_command_ids(gpt2_files):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
    assert tok.command_tokens == {
        "eos": 50256,
        "pad": 50256,
        "sop": 50257,
        "eop": 50258,
        "cls": 50259,
        "mask": 50260,
        "sep": 50261,
        "unk": 50262,
        "gmask": 50263,
        "smask": 50264,
    }
    assert tok.vocab_size == 50265
    check_common_api(tok)
    vocab = json.loads(Path(gpt2_files[0]).read_text(encoding="utf-8"))
    assert tok.encode("hello world") == [vocab["hello"], vocab["Ġworld"]]
    assert tok.encode("hello<|endoftext|>[sMASK]") == [vocab["hello"], 50256, 50264]
    text = "hello world.\nnew line [CLS]"
    assert tok.decode(tok.encode(text)) == text
    mask = tok.sentence_end_mask()
    byte = gpt2_byte_to_unicode()
    assert mask[vocab[byte[ord(".")]]] and mask[vocab[byte[ord("\n")]]]
    assert mask[vocab[byte[ord(":")]]] and not mask[vocab[byte[ord(",")]]]
    assert not mask[vocab["hello"]] and not mask[vocab["Ġworld"]]


@pytest.mark.parametrize("tokenizer_type", ["BertWordPieceLowerCase", "BertWordPieceCase"])
def test_bert_official_command_ids(bert_vocab, tokenizer_type):
    tok = build_tokenizer(tokenizer_type, vocab_file=bert_vocab)
    assert tok.command_tokens == {
        "pad": 0,
        "eos": 0,
        "cls": 101,
        "sep": 102,
        "unk": 100,
        "mask": 103,
        "sop": 30522,
        "eop": 30523,
        "gmask": 30524,
        "smask": 30525,
    }
    assert tok.vocab_size == 30526
    check_common_api(tok)
    vocab = Path(bert_vocab).read_text(encoding="utf-8").split("\n")
    ids = tok.encode("Hello worlds. [SEP]")
    if tokenizer_type == "BertWordPieceLowerCase":
        assert [vocab[i] for i in ids] == ["hello", "world", "##s", ".", "[SEP]"]
    else:
        assert [vocab[i] for i in ids] == ["Hello", "world", "##s", ".", "[SEP]"]
    assert tok.encode("xyzzy") == [100]
    mask = tok.sentence_end_mask()
    assert mask[vocab.index(".")] and mask[vocab.index("?")] and mask[vocab.index("。")]
    assert not mask[vocab.index(",")] and not mask[vocab.index("hello")]


def test_bert_vocab_without_special_tokens_is_rejected(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks \['\[CLS\]', '\[MASK\]', '\[SEP\]'\]"):
        build_tokenizer("BertWordPieceLowerCase", vocab_file=str(path))


def test_sentencepiece_reserved_ids_round_trip():
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(SP_ASSET))
    meta = json.loads(SP_ASSET.with_suffix(".json").read_text(encoding="utf-8"))
    assert tok.command_tokens == {n: e["id"] for n, e in meta["command_tokens"].items()}
    assert sorted(tok.command_tokens.values()) == list(range(10))  # reserved, distinct
    assert tok.vocab_size == meta["vocab_size"] == 1024
    check_common_api(tok)
    for name in COMMAND_TOKEN_NAMES:
        if name == "unk":  # sentencepiece's own unknown piece: never matched in text
            continue
        text = meta["command_tokens"][name]["text"]
        assert tok.decode([tok.command_tokens[name]]) == text
        assert tok.command_tokens[name] in tok.encode(f"x {text} y")
    # Identity normalisation: code, indentation and newlines survive encode -> decode.
    for text in TEXTS[:4]:
        assert tok.decode(tok.encode(text)) == text
    mask = tok.sentence_end_mask()
    assert mask[meta["newline_id"]]
    punct = [i for i in tok.encode(".?!;:") if tok.decode([i]).strip()]  # not the dummy prefix
    assert punct and all(mask[i] for i in punct)
    assert not any(mask[i] for i in tok.encode("hello world"))


def test_sentencepiece_metadata_is_validated(tmp_path):
    model = tmp_path / "sp.model"
    shutil.copy(SP_ASSET, model)
    with pytest.raises(ValueError, match="has no metadata file"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    meta = json.loads(SP_ASSET.with_suffix(".json").read_text(encoding="utf-8"))
    bad = json.loads(json.dumps(meta))
    bad["command_tokens"]["mask"]["id"] = 5
    (tmp_path / "sp.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=r"command token mask should be '\[MASK\]' at id 5"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    bad = dict(meta, model_sha256="0" * 64)
    (tmp_path / "sp.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match="model_sha256 does not match"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    (tmp_path / "sp.json").write_text(json.dumps(meta), encoding="utf-8")
    build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))


def test_train_sentencepiece_reserves_command_tokens(tmp_path):
    import gzip

    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(40), f)]
    model = train_sentencepiece(
        texts, str(tmp_path / "bpe"), vocab_size=600, model_type="bpe", max_sentences=3000
    )
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == 600
    meta = json.loads((tmp_path / "bpe.json").read_text(encoding="utf-8"))
    assert meta["trainer"]["num_lines"] == 3000
    assert tok.command_tokens["unk"] == 0 and tok.command_tokens["pad"] == 1
    check_common_api(tok)
    assert tok.decode(tok.encode(texts[5])) == texts[5]
    with pytest.raises(ValueError, match="must exceed"):
        train_sentencepiece(texts, str(tmp_path / "tiny"), vocab_size=100)


def test_build_tokenizer_errors():
    with pytest.raises(ValueError, match="unknown tokenizer type 'Nope'"):
        build_tokenizer("Nope")
    with pytest.raises(ValueError, match="needs --vocab-file"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model="missing.model")


def test_sentence_end_mask_is_cached_array():
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(SP_ASSET))
    assert tok.sentence_end_mask() is tok.sentence_end_mask()
    assert isinstance(tok.sentence_end_mask(), np.ndarray)
