"""Tokenizers: the official GLM ids (text and command tokens) of every released vocabulary,
sentencepiece reserved ids and metadata validation, any sentencepiece model with appended
command tokens, tokenizer.json files, batch encode == single encode, sentence-end masks, decode,
pickling by rebuild, the registry, and training.

``tests/assets/tokenizers/official_ids.json`` holds what the official tokenizers (THUDM/GLM at
commit 4f61ed7) return for its ``samples``: 22 hand-written strings (English and Chinese,
newlines, runs of spaces, tabs, punctuation, command tokens written in the text, accents, digits,
emoji, whitespace-only) and 24 seeded random mixes of such characters. It was produced by running
the official code, not by this package:

1. ``git show 4f61ed7:data_utils/F`` for F in tokenization.py, tokenization_gpt2.py, wordpiece.py,
   sp_tokenizer.py and file_utils.py into ``/tmp/glm_official/data_utils/`` with an empty
   ``__init__.py`` (the official one imports the whole data pipeline), and a ``utils.py`` that
   only defines ``print_rank_0`` (the official one imports the training stack).
2. The official vocabulary files of that commit where its code looks for them, relative to the
   working directory: ``.pytorch_pretrained_bert/`` {bert-base-uncased, bert-large-uncased}-vocab.txt,
   gpt2-vocab.json, gpt2-merges.txt, roberta-vocab.json, roberta-merges.txt and
   ``chinese_sentencepiece/cog-pretrain.model`` (byte-identical to ``megatron_glm/data/vocab``).
3. ``pip install --target /tmp/offsite regex nltk boto3 requests tqdm`` (modules the official
   files import), then from that working directory with ``PYTHONPATH=/tmp/offsite:/tmp/glm_official``
   and this project's torch and sentencepiece: for each entry,
   ``tok = make_tokenizer(type, None, "tokenizer.model", None, model_type, add_block_symbols=True,
   add_task_mask=True, add_decoder_mask=False, add_sentinel_token=0, fix_command_token=fix)``;
   record ``{t.name: t.Id for t in tok._command_tokens}`` (ENC, MASK, gMASK, sMASK renamed cls,
   mask, gmask, smask), ``tok.num_tokens``, and ``tok.EncodeAsIds(s).tokenization`` per sample.
4. Its ``decoder_mask`` entry: the same with ``add_decoder_mask=True`` (what ``--block-mask-prob``
   > 0 sets; dBLOCK renamed dblock), for three samples that hold ``[dBLOCK]``; the script also
   checked that the 46 samples above encode to the same ids with it.

The same procedure on 3,000 further random strings agreed with these tokenizers everywhere; only
the ids are committed, never the official code.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config.data import (
    TOKENIZER_TYPES,
    BlankInfillingConfig,
    DataConfig,
    TokenizerSpec,
)
from megatron_glm.config.model import pad_vocab_size
from megatron_glm.data.blank_infilling import BlankInfillingCollator
from megatron_glm.data.sentencepiece import (
    ChineseSPTokenizer,
    SentencePieceTokenizer,
    train_sentencepiece,
)
from megatron_glm.data.tokenizers import (
    COMMAND_TOKEN_NAMES,
    TOKENIZER_BUILDERS,
    build_tokenizer,
    bundled_vocab_file,
    tokenizer_from_spec,
)

REPO = Path(__file__).resolve().parents[2]
SP_ASSET = REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model"
OFFICIAL_IDS = REPO / "tests" / "assets" / "tokenizers" / "official_ids.json"
# official_ids.json entry -> our flags for the same tokenizer (bundled files, no paths given).
OFFICIAL_SPECS = {
    "bert-base-uncased": dict(
        tokenizer_type="BertWordPieceTokenizer", tokenizer_model_type="bert-base-uncased"
    ),
    "bert-large-uncased": dict(tokenizer_type="BertWordPieceTokenizer"),  # the official default
    "gpt2": dict(tokenizer_type="GPT2BPETokenizer"),
    "roberta": dict(tokenizer_type="GPT2BPETokenizer", tokenizer_model_type="roberta"),
    "chinese-sp": dict(tokenizer_type="ChineseSPTokenizer"),
    "chinese-sp-fix-command-token": dict(
        tokenizer_type="ChineseSPTokenizer", fix_command_token=True
    ),
}
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
        SentencePieceTokenizer(str(model))
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


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer type 'Nope'"):
        build_tokenizer("Nope")
    with pytest.raises(ValueError, match="BertWordPieceCase needs --vocab-file"):
        build_tokenizer("BertWordPieceCase")
    with pytest.raises(ValueError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model="missing.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    # Model types without a bundled vocabulary, unknown model types, half a BPE pair.
    with pytest.raises(ValueError, match=r"'bert-base-cased' is bundled .* --vocab-file"):
        build_tokenizer("BertWordPieceTokenizer", tokenizer_model_type="bert-base-cased")
    with pytest.raises(ValueError, match="'bert-huge' is not one of"):
        build_tokenizer("BertWordPieceTokenizer", tokenizer_model_type="bert-huge")
    with pytest.raises(ValueError, match="'gpt3' is not one of"):
        build_tokenizer("GPT2BPETokenizer", tokenizer_model_type="gpt3")
    with pytest.raises(ValueError, match="needs both --vocab-file and --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=bundled_vocab_file("gpt2-vocab.json"))


def test_sentence_end_mask_is_cached_array():
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(SP_ASSET))
    assert tok.sentence_end_mask() is tok.sentence_end_mask()
    assert isinstance(tok.sentence_end_mask(), np.ndarray)


# ---- The official GLM tokenizers on their released vocabularies ------------------------------


@pytest.fixture(scope="module")
def official() -> dict:
    data = json.loads(OFFICIAL_IDS.read_text(encoding="utf-8"))
    assert data["header"]["official_commit"] == "4f61ed7"
    assert set(data["tokenizers"]) == set(OFFICIAL_SPECS)
    return data


@pytest.fixture(scope="module")
def official_tokenizers() -> dict:
    """Our tokenizer for every entry of official_ids.json, built once per module."""
    return {key: build_tokenizer(**spec) for key, spec in OFFICIAL_SPECS.items()}


def test_registry_matches_the_configuration_names():
    assert tuple(TOKENIZER_BUILDERS) == TOKENIZER_TYPES


@pytest.mark.parametrize("key", list(OFFICIAL_SPECS))
def test_official_ids(official, official_tokenizers, key):
    """Text and command-token ids equal the official tokenizer's on every sample."""
    ref, tok = official["tokenizers"][key], official_tokenizers[key]
    assert tok.command_tokens == ref["command_tokens"]
    assert tok.vocab_size == ref["num_tokens"]
    assert pad_vocab_size(tok.vocab_size, 128) == ref["padded_vocab_size"]
    samples = official["samples"]
    assert tok.encode_batch(samples) == ref["ids"]
    assert [tok.encode(s) for s in samples[:22]] == ref["ids"][:22]
    assert [a.tolist() for a in tok.encode_batch_arrays(samples)] == ref["ids"]


def test_official_vocab_sizes(official):
    """The sizes the released checkpoints were trained with (embedding rows, padded to 128)."""
    sizes = {
        k: (v["num_tokens"], v["padded_vocab_size"]) for k, v in official["tokenizers"].items()
    }
    assert sizes == {
        "bert-base-uncased": (30522 + 4, 30592),
        "bert-large-uncased": (30522 + 4, 30592),
        "gpt2": (50257 + 8, 50304),
        "roberta": (50265 + 4, 50304),
        "chinese-sp": (50000 + 9, 50048),
        "chinese-sp-fix-command-token": (50000 + 10, 50048),
    }


@pytest.mark.parametrize("key", list(OFFICIAL_SPECS))
def test_official_tokenizers_common_api(official_tokenizers, key):
    check_common_api(official_tokenizers[key])


def test_official_tokenizers_decode_and_sentence_ends(official_tokenizers):
    gpt2, roberta = official_tokenizers["gpt2"], official_tokenizers["roberta"]
    text = "Hello  world.\nIt's 3.14, isn't it? [CLS] end"
    for tok in (gpt2, roberta):
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode_batch_arrays([text])[0]) == text
        ends = tok.sentence_end_mask()
        assert all(ends[tok.encode(f"x{c}")[-1]] for c in ".?!;:\n")
        assert not any(ends[tok.encode(f"x{c}")[-1]] for c in (",", " world", "-"))
    assert roberta.decode([roberta.eos_id, roberta.cls_id, roberta.mask_id]) == "[SEP][CLS][MASK]"
    bert = official_tokenizers["bert-base-uncased"]
    assert (
        bert.decode(bert.encode("Hello, World! [MASK] [gMASK]")) == "hello, world! [MASK] [gMASK]"
    )
    assert bert.sentence_end_mask()[bert.encode("。")[0]]
    for key in ("chinese-sp", "chinese-sp-fix-command-token"):
        tok = official_tokenizers[key]
        assert tok.decode(tok.encode("你好世界 [CLS]第二句")) == "你好世界[CLS]第二句"
        ends = tok.sentence_end_mask()
        assert all(ends[tok.encode(f"好{c}")[-1]] for c in "。？！；：")
        assert not ends[tok.encode("好，")[-1]]
        assert not ends[50005]  # the id the official layout leaves unused
    fixed, official_bug = (
        official_tokenizers["chinese-sp-fix-command-token"],
        official_tokenizers["chinese-sp"],
    )
    assert fixed.decode([fixed.gmask_id, fixed.eop_id]) == "[gMASK]<|endofpiece|>"
    # Without --fix-command-token, [gMASK] and <|endofpiece|> share an id (as in the official code).
    assert official_bug.eop_id == official_bug.gmask_id == 50007
    assert official_bug.encode("<|endofpiece|>[gMASK]") == [50007, 50007]


def test_tokenizers_pickle_by_rebuild_not_by_content(official_tokenizers):
    """Data loader workers get the file paths and rebuild: a pickle holds no vocabulary."""
    for tok in official_tokenizers.values():
        data = pickle.dumps(tok)
        assert len(data) < 1000
        assert pickle.loads(data).command_tokens == tok.command_tokens
    spec = TokenizerSpec("GPT2BPETokenizer", tokenizer_model_type="roberta")
    assert tokenizer_from_spec(spec).command_tokens == official_tokenizers["roberta"].command_tokens


def test_bert_model_types_and_case(official_tokenizers):
    vocab = bundled_vocab_file("bert-base-uncased-vocab.txt")
    cased = build_tokenizer(
        "BertWordPieceTokenizer", vocab_file=vocab, tokenizer_model_type="bert-base-cased"
    )
    lower = official_tokenizers["bert-base-uncased"]
    # The uncased vocabulary has no capitals: cased WordPiece leaves "Hello" unknown.
    assert cased.encode("Hello") == [cased.unk_id] and lower.encode("Hello") == [7592]
    assert cased.name == "BertWordPieceTokenizer" and cased.command_tokens == lower.command_tokens
    megatron = build_tokenizer("BertWordPieceLowerCase")  # Megatron's name, bundled uncased vocab
    assert megatron.encode("Héllo [MASK]") == lower.encode("Héllo [MASK]") == [7592, 103]


def test_ineffective_flags_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_glm.data.tokenizers"):
        build_tokenizer("BertWordPieceTokenizer", merge_file="x.txt", fix_command_token=True)
    assert "--merge-file has no effect on tokenizer type BertWordPieceTokenizer" in caplog.text
    assert "--fix-command-token has no effect" in caplog.text


# ---- Any sentencepiece model: command tokens appended as the official ChineseSPTokenizer ------


def test_sentencepiece_model_without_metadata_appends_command_tokens(tmp_path, caplog):
    cog = bundled_vocab_file("cog-pretrain.model")
    for fix in (False, True):
        by_path = build_tokenizer("SentencePieceTokenizer", cog, fix_command_token=fix)
        assert isinstance(by_path, ChineseSPTokenizer)
        official = ChineseSPTokenizer(fix_command_token=fix)
        assert by_path.command_tokens == official.command_tokens
        assert by_path.vocab_size == official.vocab_size
    # One of our models whose metadata file is lost: its reserved pieces are not used.
    model = tmp_path / "lost.model"
    shutil.copy(SP_ASSET, model)
    with caplog.at_level(logging.WARNING, logger="megatron_glm.data.sentencepiece"):
        tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(model))
    assert "reserved pieces" in caplog.text
    n = 1024
    assert tok.command_tokens == {
        "pad": n,
        "eos": n,
        "sep": n + 1,
        "cls": n + 2,
        "mask": n + 3,
        "unk": n + 4,
        "sop": n + 6,
        "eop": n + 7,
        "gmask": n + 7,
        "smask": n + 8,
    }
    assert tok.vocab_size == n + 9
    check_common_api(tok)
    assert tok.encode("x [MASK]") == tok.encode("x") + [n + 3]  # [MASK] eats the space before it
    assert tok.encode("  \n ") == []  # whitespace-only text encodes to nothing, as officially


def test_train_sentencepiece_skips_invalid_unicode(tmp_path, caplog):
    import gzip

    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(40), f)]
    with caplog.at_level(logging.WARNING, logger="megatron_glm.data.sentencepiece"):
        model = train_sentencepiece(
            ["bad \ud800 text", *texts], str(tmp_path / "sp"), 600, "bpe", max_sentences=2000
        )
    assert "skipped 1 texts that are not valid Unicode" in caplog.text
    meta = json.loads((tmp_path / "sp.json").read_text(encoding="utf-8"))
    assert meta["trainer"]["num_invalid_texts"] == 1 and Path(model).is_file()


# ---- tokenizer.json (HuggingFaceTokenizer) -----------------------------------------------------


def _save_bpe(path: Path, kind: str, specials: list[str]) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = (
        bundled_vocab_file(f"{kind}-vocab.json"),
        bundled_vocab_file(f"{kind}-merges.txt"),
    )
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.enable_truncation(8)  # a saved setting that must not cut our documents
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> dict[str, str]:
    """tokenizer.json files as the Hugging Face hub ships them for gpt2, roberta-large and
    bert-base-uncased (built here from the bundled vocabularies), and a Llama-style one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    root = tmp_path_factory.mktemp("hf")
    files = {
        "gpt2": _save_bpe(root / "gpt2.json", "gpt2", ["<|endoftext|>"]),
        "roberta": _save_bpe(
            root / "roberta.json", "roberta", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        ),
    }
    bert = Tokenizer(
        models.WordPiece.from_file(
            bundled_vocab_file("bert-base-uncased-vocab.txt"), unk_token="[UNK]"
        )
    )
    bert.normalizer = normalizers.BertNormalizer(lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.decoder = decoders.WordPiece()
    bert.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    (root / "bert").mkdir()
    bert.save(str(root / "bert" / "tokenizer.json"))
    files["bert-base-uncased"] = str(root / "bert")  # a directory holding tokenizer.json
    llama = Tokenizer(
        models.BPE(
            {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "ab": 5},
            [("a", "b")],
            unk_token="<unk>",
        )
    )
    llama.add_special_tokens(["<unk>", "<s>", "</s>"])
    llama.save(str(root / "llama.json"))
    files["llama"] = str(root / "llama.json")
    return files


@pytest.mark.parametrize("key", ["gpt2", "roberta", "bert-base-uncased"])
def test_hf_tokenizer_json_gives_the_official_ids(official, hf_files, key):
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_files[key])
    ref = official["tokenizers"][key]
    assert tok.command_tokens == ref["command_tokens"]
    assert tok.vocab_size == ref["num_tokens"]
    # Where the rules differ: the tokenizer's own special tokens written in the text are matched
    # (the official code reads "<s>" as text), and GLM's "<|endoftext|>" always means eos.
    differ = {
        "roberta": ("<s>", "</s>", "<mask>", "<unk>", "<pad>"),
        "bert-base-uncased": ("<|endoftext|>",),
    }
    same = [
        i for i, s in enumerate(official["samples"]) if not any(t in s for t in differ.get(key, ()))
    ]
    assert len(same) >= 40
    got = tok.encode_batch([official["samples"][i] for i in same])
    assert got == [ref["ids"][i] for i in same]
    check_common_api(tok)


def test_hf_tokenizer_json_own_specials_and_appended_ids(hf_files):
    roberta = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_files["roberta"])
    assert roberta.encode("<s>x</s>") == roberta.encode("[CLS]x<|endoftext|>") == [0, 1178, 2]
    llama = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_files["llama"])
    # Reused: eos/pad/sep = </s>, cls = <s>, unk = <unk>; appended from id 6 in GLM's order.
    assert llama.command_tokens == {
        "pad": 2,
        "eos": 2,
        "sep": 2,
        "cls": 1,
        "unk": 0,
        "sop": 6,
        "eop": 7,
        "mask": 8,
        "gmask": 9,
        "smask": 10,
    }
    assert llama.vocab_size == 11
    assert llama.encode("ab [MASK]b</s>[gMASK]") == [5, 8, 4, 2, 9]
    assert llama.decode([1, 5, 8, 2]) == "<s>ab[MASK]</s>"
    check_common_api(llama)


# ---- [dBLOCK]: block masking's Part B token (--block-mask-prob > 0) ------------------------------


@pytest.fixture(scope="module")
def dblock_tokenizers() -> dict:
    """Our tokenizer for every entry of official_ids.json, with [dBLOCK] as block masking asks."""
    return {
        key: build_tokenizer(**spec, block_mask_token=True) for key, spec in OFFICIAL_SPECS.items()
    }


@pytest.mark.parametrize("key", list(OFFICIAL_SPECS))
def test_official_dblock_ids(official, official_tokenizers, dblock_tokenizers, key):
    """With the flag, ids, vocabulary size and encodings are the official add_decoder_mask ones;
    everything else is unchanged. Without it there is no [dBLOCK] and its text is ordinary text."""
    ref = official["decoder_mask"]["tokenizers"][key]
    tok, plain = dblock_tokenizers[key], official_tokenizers[key]
    assert tok.command_tokens == ref["command_tokens"]
    assert tok.dblock_id == ref["command_tokens"]["dblock"] == plain.vocab_size
    assert tok.vocab_size == ref["num_tokens"] == plain.vocab_size + 1
    assert pad_vocab_size(tok.vocab_size, 128) == ref["padded_vocab_size"]
    assert tok.encode_batch(official["decoder_mask"]["samples"]) == ref["ids"]
    assert tok.encode_batch(official["samples"]) == official["tokenizers"][key]["ids"]
    assert plain.dblock_id is None and "dblock" not in plain.command_tokens
    assert plain.vocab_size not in plain.encode("a [dBLOCK] b")
    assert "[dBLOCK]" in tok.decode(tok.encode("a [dBLOCK] b"))
    assert not tok.sentence_end_mask()[tok.dblock_id]
    check_common_api(tok)
    assert pickle.loads(pickle.dumps(tok)).dblock_id == tok.dblock_id
    assert tok.metadata()["command_tokens"]["dblock"] == tok.dblock_id


def test_dblock_follows_block_mask_prob_of_the_data_config(official):
    """DataConfig.tokenizer_spec asks for [dBLOCK] exactly when block masking is on."""
    on = DataConfig(
        tokenizer_type="ChineseSPTokenizer",
        fix_command_token=True,
        infilling=BlankInfillingConfig(block_mask_prob=0.1),
    )
    off = DataConfig(tokenizer_type="ChineseSPTokenizer", fix_command_token=True)
    ref = official["decoder_mask"]["tokenizers"]["chinese-sp-fix-command-token"]
    assert tokenizer_from_spec(on.tokenizer_spec).dblock_id == ref["command_tokens"]["dblock"]
    assert tokenizer_from_spec(off.tokenizer_spec).dblock_id is None


def test_dblock_in_our_sentencepiece_and_tokenizer_json(hf_files):
    sp = build_tokenizer("SentencePieceTokenizer", str(SP_ASSET), block_mask_token=True)
    assert sp.dblock_id == 1024 and sp.vocab_size == 1025
    assert {n: i for n, i in sp.command_tokens.items() if n != "dblock"} == build_tokenizer(
        "SentencePieceTokenizer", str(SP_ASSET)
    ).command_tokens
    check_common_api(sp)
    # No piece of the model: printed by decode, but its text in the input stays text.
    ab = sp.encode("a b")
    assert sp.decode([*ab, 1024, *ab, 1024]) == "a b[dBLOCK]a b[dBLOCK]"
    assert 1024 not in sp.encode("x [dBLOCK]")
    assert len(sp.sentence_end_mask()) == 1025
    assert pickle.loads(pickle.dumps(sp)).vocab_size == 1025
    # tokenizer.json: appended after GLM's appended tokens (llama: 6 ids + 5 appended).
    llama = build_tokenizer("HuggingFaceTokenizer", hf_files["llama"], block_mask_token=True)
    assert llama.dblock_id == 11 and llama.vocab_size == 12
    assert llama.encode("ab[dBLOCK]b") == [5, 11, 4]
    assert llama.decode([5, 11]) == "ab[dBLOCK]"
    gpt2 = build_tokenizer("HuggingFaceTokenizer", hf_files["gpt2"], block_mask_token=True)
    assert gpt2.dblock_id == 50265 and gpt2.vocab_size == 50266  # the official GPT-2 ids


def _corpus_raw_samples(tok, n: int, count: int) -> list[np.ndarray]:
    """Raw samples as the packer cuts them: [CLS] document [eos] ..., n tokens each."""
    import gzip

    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(200), f)]
    stream = np.concatenate(
        [np.array([tok.cls_id, *ids, tok.eos_id]) for ids in tok.encode_batch(texts)]
    )
    assert stream.size >= n * count
    return [stream[i * n : (i + 1) * n].astype(np.int64) for i in range(count)]


@pytest.mark.parametrize("key", ["gpt2", "bert-large-uncased", "chinese-sp-fix-command-token"])
def test_block_masking_writes_the_official_dblock(official, dblock_tokenizers, key, caplog):
    """block_mask_prob=0.5: about half the Part B inputs after [sop] become the official [dBLOCK]
    id, never in Part A nor in the labels, and no fallback warning is logged."""
    tok = dblock_tokenizers[key]
    dblock = official["decoder_mask"]["tokenizers"][key]["command_tokens"]["dblock"]
    cfg = BlankInfillingConfig(bert_prob=1.0, block_mask_prob=0.5, task_mask=True)
    with caplog.at_level(logging.WARNING, logger="megatron_glm.data.blank_infilling"):
        col = BlankInfillingCollator(cfg, tok, 256, seed=5)
    assert "no [dBLOCK]" not in caplog.text and col.ids.dblock == dblock
    raws = _corpus_raw_samples(tok, col.plan.raw_length, 8)
    out = col.collate_arrays(raws, list(range(8)))
    assert out["objective"] == "bert"
    hidden = visible = 0
    for row in range(8):
        sep, used = int(out["sep"][row]), int(out["used"][row])
        tokens, labels = out["tokens"][row], out["labels"][row]
        assert dblock not in tokens[:sep] and dblock not in labels
        part_b = tokens[sep:used]
        after_sop = part_b[part_b != tok.sop_id]
        hidden += int((after_sop == dblock).sum())
        visible += int((after_sop != dblock).sum())
    assert 0.35 < hidden / (hidden + visible) < 0.65, (hidden, visible)
    # Without [dBLOCK] the collator says so and writes [MASK] instead.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megatron_glm.data.blank_infilling"):
        plain = BlankInfillingCollator(cfg, build_tokenizer(**OFFICIAL_SPECS[key]), 256, seed=5)
    assert "the tokenizer has no [dBLOCK]" in caplog.text
    masked = plain.collate_arrays(raws, list(range(8)))["tokens"]
    assert dblock not in masked
    assert np.array_equal(np.where(out["tokens"] == dblock, tok.mask_id, out["tokens"]), masked)
