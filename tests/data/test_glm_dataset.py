"""GLM raw samples: packing, split by documents, blending, the cached sample index, any-index access;
one [eos] per document whether or not the data was preprocessed with --append-eod; only the splits
a run uses are built, and a split too short for one raw sample is reported (check_splits)."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.config.data import BlankInfillingConfig, DataConfig
from megatron_glm.data import glm_dataset
from megatron_glm.data.glm_dataset import (
    BlendedDataset,
    GLMDataset,
    build_glm_datasets,
    check_splits,
    split_document_ranges,
)
from megatron_glm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_glm.data.tokenizers import build_tokenizer
from tests.data.test_blank_infilling import ToyTokenizer, toy_document
from tests.tools.cli import REPO, check_tool, preprocess_jsonl

CLS, EOS = ToyTokenizer.cls_id, ToyTokenizer.eos_id
SP_MODEL = str(REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model")
SP_ARGS = ("--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", SP_MODEL)
# Words of the generated English corpus (also the vocabulary of the test BERT tokenizer).
_WORD_TEXT = (
    "the a an of to in on at by with from under over after before while and but or so because "
    "river hill town road bridge garden window morning evening winter summer light rain wind "
    "old young green quiet bright long small warm cold slow early late every some many few "
    "people children birds trees boats farmers teachers walk sing build carry watch open close "
    "find keep send wait grow remember follow near far always never often today tomorrow"
)
WORDS = tuple(_WORD_TEXT.split())


def write_toy_dataset(
    prefix: str,
    num_docs: int,
    seed: int,
    tag_base: int | None = None,
    min_len: int = 5,
    max_len: int = 200,
    sentences_per_doc: int = 1,
) -> list[np.ndarray]:
    """Write documents; with ``tag_base`` every token of document d is ``tag_base + d`` (so a
    sample's tokens name their documents)."""
    rng = np.random.default_rng(seed)
    docs = []
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for d in range(num_docs):
            length = int(rng.integers(min_len, max_len))
            doc = (
                np.full(length, tag_base + d) if tag_base is not None else toy_document(rng, length)
            )
            cuts = np.sort(rng.integers(0, length + 1, size=sentences_per_doc - 1))
            builder.add_document(
                doc, lengths=np.diff(np.concatenate(([0], cuts, [length]))).tolist()
            )
            docs.append(doc.astype(np.int64))
    return docs


def write_paragraphs(path: Path, count: int, seed: int = 0) -> list[str]:
    """A jsonl corpus of ``count`` generated English paragraphs (1-6 sentences of 4-14 words);
    returns the texts."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize()
            + rng.choice(".?!.")
            for _ in range(rng.randint(1, 6))
        ]
        texts.append(" ".join(sentences))
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "source": f"generated-{i}"}) + "\n")
    return texts


def write_bert_vocab(path: Path) -> tuple[str, ...]:
    """A WordPiece vocabulary for the generated corpus; its tokenizer's eos is [PAD] = id 0."""
    path.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "!", *WORDS])
    )
    return ("--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(path))


def expected_window(stream: np.ndarray, j: int, n: int, cls_id: int, eos_id: int) -> np.ndarray:
    """Sample j of an epoch whose units ``[CLS] doc [eos]``, in order, make ``stream``: the window
    of n tokens at j (n - 1), moved past an [eos], opening with a [CLS] (the module docstring)."""
    start = j * (n - 1)
    start += int(stream[start] == eos_id)  # never open on an [eos]
    if stream[start] == cls_id:
        return stream[start : start + n]
    return np.concatenate(([cls_id], stream[start : start + n - 1]))


def data_config(
    paths: list[str], seq_length: int = 64, seed: int = 5, split: str = "8,1,1", **kw
) -> DataConfig:
    return DataConfig(
        data_path=paths,
        split=split,
        seq_length=seq_length,
        seed=seed,
        infilling=BlankInfillingConfig(**kw),
    )


def test_packing_reproduces_the_document_stream(tmp_path):
    prefix = str(tmp_path / "docs")
    docs = write_toy_dataset(prefix, 60, seed=0, sentences_per_doc=3)
    n = 50
    ds = GLMDataset(prefix, (0, 60), n, seed=1, cls_id=CLS, eos_id=EOS)
    doc_order, samples, shuffle = ds._epoch(0)
    stream = np.concatenate([np.concatenate(([CLS], docs[d], [EOS])) for d in doc_order])
    inverse = np.argsort(shuffle)
    for j in range(ds.samples_per_epoch):
        text = ds[int(inverse[j])]["text"]
        assert text.size == n and text[0] == CLS and text[1] != EOS
        assert np.array_equal(text, expected_window(stream, j, n, CLS, EOS)), j
    # as many windows as fit: only the epoch's tail (less than one sample) is left out
    last_start = (ds.samples_per_epoch - 1) * (n - 1)
    assert last_start + n + 1 <= stream.size < last_start + (n - 1) + n + 1


def test_any_index_is_a_pure_function_of_seed_and_index(tmp_path):
    prefix = str(tmp_path / "docs")
    write_toy_dataset(prefix, 30, seed=0)
    a = GLMDataset(prefix, (0, 30), 40, seed=3, cls_id=CLS, eos_id=EOS, num_samples=10)
    b = GLMDataset(prefix, (0, 30), 40, seed=3, cls_id=CLS, eos_id=EOS, num_samples=500)
    c = GLMDataset(prefix, (0, 30), 40, seed=4, cls_id=CLS, eos_id=EOS)
    far = 7 * a.samples_per_epoch + 3  # an epoch nobody built yet
    for i in (0, 1, a.samples_per_epoch, far):
        assert np.array_equal(a[i]["text"], b[i]["text"]) and a[i]["index"] == i
    assert any(not np.array_equal(a[i]["text"], c[i]["text"]) for i in range(5))
    import pickle  # what DataLoader workers started with spawn receive (test-only, our own data)

    clone = pickle.loads(pickle.dumps(b))
    assert clone._indexed is None and np.array_equal(clone[far]["text"], b[far]["text"])
    epoch0 = {tuple(a[i]["text"]) for i in range(a.samples_per_epoch)}
    epoch1 = [tuple(a[i]["text"]) for i in range(a.samples_per_epoch, 2 * a.samples_per_epoch)]
    assert epoch1 != list(epoch0), "each epoch has its own document order"


def test_split_by_documents_without_overlap(tmp_path):
    prefix = str(tmp_path / "tagged")
    write_toy_dataset(prefix, 200, seed=1, tag_base=100, max_len=60)
    assert split_document_ranges(1000, (0.949, 0.05, 0.001)) == [(0, 949), (949, 999), (999, 1000)]
    cfg = data_config([prefix], split="80,15,5")
    splits = build_glm_datasets(cfg, ToyTokenizer(), num_samples=(50, 20, 5))
    seen = []
    for ds, (lo, hi) in zip(splits, [(0, 160), (160, 190), (190, 200)]):
        assert ds.document_range == (lo, hi)
        docs = set()
        for i in range(ds.samples_per_epoch):
            text = ds[i]["text"]
            docs |= {int(t) - 100 for t in text if t >= 100}
        assert docs <= set(range(lo, hi)) and len(docs) > 0.8 * (hi - lo)
        seen.append(docs)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    train_only = data_config([prefix], split="1,0,0")
    built = build_glm_datasets(train_only, ToyTokenizer(), (5, 5, 5), splits=("train",))
    assert built[0].document_range == (0, 200) and built[1] is None and built[2] is None
    with pytest.raises(ValueError, match="the valid split gets 0 of the dataset's 200 documents"):
        build_glm_datasets(train_only, ToyTokenizer(), (5, 5, 5), splits=("train", "valid"))


def test_blending_weights_and_determinism(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_toy_dataset(a, 50, seed=2, tag_base=1000)
    write_toy_dataset(b, 50, seed=3, tag_base=3000)
    cfg = data_config(["0.3", a, "0.7", b], split="1,0,0")
    train, valid, test = build_glm_datasets(cfg, ToyTokenizer(), (1000, 0, 0), splits=["train"])
    assert isinstance(train, BlendedDataset) and valid is None and test is None
    from_a = np.array([int(train[i]["text"].max()) < 3000 for i in range(1000)])
    counts = np.cumsum(from_a)
    expected = 0.3 * np.arange(1, 1001)
    assert np.max(np.abs(counts - expected)) <= 1.0, "every prefix within one sample of its share"
    again = build_glm_datasets(cfg, ToyTokenizer(), (10, 0, 0), splits=["train"])[0]
    for i in (0, 17, 999, 5000):  # a shorter build and an index beyond the requested size agree
        assert np.array_equal(train[i]["text"], again[i]["text"]) and train[i]["index"] == i
    weights = BlendedDataset([train.datasets[0], train.datasets[1]], [1.0, 3.0], 400)
    assert int((weights.dataset_index == 0).sum()) == 100


def test_prefixes_without_weights_blend_by_size(tmp_path):
    """Megatron's ``--data-path A B``: each dataset weighs its number of samples."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_toy_dataset(a, 30, seed=2, tag_base=1000)
    write_toy_dataset(b, 90, seed=3, tag_base=3000)
    cfg = data_config([a, b], split="1,0,0")
    assert cfg.weighted_paths == [(None, a), (None, b)]
    train = build_glm_datasets(cfg, ToyTokenizer(), (600, 0, 0), splits=["train"])[0]
    sizes = [d.samples_per_epoch for d in train.datasets]
    assert sizes[1] > 2 * sizes[0]
    from_a = sum(int(train[i]["text"].max()) < 3000 for i in range(600))
    assert abs(from_a - 600 * sizes[0] / sum(sizes)) <= 1.0


def test_cache_is_reused_and_keyed_by_parameters(tmp_path, monkeypatch):
    prefix = str(tmp_path / "docs")
    write_toy_dataset(prefix, 40, seed=4)
    cache = str(tmp_path / "cache")
    first = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert first.built_epochs == [0]
    files = sorted(os.listdir(cache))
    # docs/samples/shuffle of epoch 0 and the per-document [eos] flags, each set with its record
    assert len(files) == 6 and sum(f.endswith(".npy") for f in files) == 4
    assert sum(f.endswith("_eos.npy") for f in files) == 1
    assert sum(f.endswith("_sha256.json") for f in files) == 2
    mtimes = [os.path.getmtime(os.path.join(cache, f)) for f in files]
    second = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert second.built_epochs == [], "second build loads the cached index"
    assert [os.path.getmtime(os.path.join(cache, f)) for f in files] == mtimes
    assert np.array_equal(first[3]["text"], second[3]["text"])
    for other in (dict(seed=10), dict(raw_length=47), dict(document_range=(0, 39))):
        args = dict(prefix=prefix, document_range=(0, 40), raw_length=48, seed=9) | other
        ds = GLMDataset(cls_id=CLS, eos_id=EOS, cache_dir=cache, **args)
        assert ds.built_epochs == [0] and ds.cache_key != first.cache_key
    # an index built by an older packing (format 1 doubled a stored [eos]) is never reused
    monkeypatch.setattr(glm_dataset, "_INDEX_FORMAT", 1)
    old = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert old.cache_key != first.cache_key and old.built_epochs == [0]
    for f in os.listdir(cache):  # plain arrays, loadable without pickle
        if f.endswith(".npy"):
            np.load(os.path.join(cache, f), allow_pickle=False)
    default = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS)
    assert os.path.isfile(default.cache_paths(0)["docs"]) and default.cache_paths(0)[
        "docs"
    ].startswith(str(tmp_path)), "cached next to the data by default"


def test_raw_length_is_seq_length_and_errors(tmp_path):
    prefix = str(tmp_path / "docs")
    write_toy_dataset(prefix, 10, seed=5, max_len=20)
    cfg = data_config([prefix], seq_length=64, split="1,0,0")
    train = build_glm_datasets(cfg, ToyTokenizer(), (4, 0, 0), splits=("train",))[0]
    assert train[0]["text"].size == cfg.raw_sample_length == 64 < cfg.input_length
    with pytest.raises(ValueError, match="shorter than one raw sample"):
        GLMDataset(prefix, (0, 2), 500, seed=0, cls_id=CLS, eos_id=EOS)
    with pytest.raises(ValueError, match="document range"):
        GLMDataset(prefix, (5, 50), 10, seed=0, cls_id=CLS, eos_id=EOS)


def test_data_config_flags_and_validation():
    import argparse

    from megatron_glm.config.data import add_data_args

    parser = add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--data-path",
            "0.3",
            "a",
            "0.7",
            "b",
            "--split",
            "949,50,1",
            "--seq-length",
            "256",
            "--bert-prob",
            "0.5",
            "--gap-sentence-prob",
            "0.3",
            "--gpt-min-ratio",
            "0.25",
            "--task-mask",
            "--no-shuffle-block",
            "--no-block-position",
            "--block-mask-prob",
            "0.1",
            "--short-seq-prob",
            "0.02",
        ]
    )
    cfg = DataConfig.from_args(args)
    assert cfg.weighted_paths == [(0.3, "a"), (0.7, "b")] and cfg.seq_length == 256
    assert cfg.split_fractions == pytest.approx((0.949, 0.05, 0.001))
    inf = cfg.infilling
    assert (inf.bert_prob, inf.gap_sentence_prob, inf.gpt_min_ratio) == (0.5, 0.3, 0.25)
    assert inf.task_mask and not inf.shuffle_blocks and not inf.block_position_encoding
    assert inf.gpt_prob == pytest.approx(0.2)
    for bad in (
        dict(split="1,x"),
        dict(data_path=["0.3", "a", "b"]),
        dict(seq_length=4),
        dict(data_path=["-1", "a", "1", "b"]),
    ):
        with pytest.raises(ValueError):
            DataConfig(**({"data_path": ["p"]} | bad))


# -- one [eos] per document, --append-eod or not ---------------------------------------------------


@pytest.mark.parametrize("kind", ["sentencepiece", "bert"])
def test_one_eos_per_document_with_or_without_append_eod(tmp_path, kind):
    """The same corpus preprocessed with and without --append-eod, and a merge of an --append-eod
    half and a plain half, give identical raw samples: ``[CLS] text [eos]`` per document. BERT's
    eos is [PAD] = 0 (as in the official GLM), the id a pad-aware rule would skip."""
    corpus, first, second = tmp_path / "c.jsonl", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    texts = write_paragraphs(corpus, 120, seed=1)
    lines = corpus.read_text().splitlines(keepends=True)
    first.write_text("".join(lines[:60]))
    second.write_text("".join(lines[60:]))
    if kind == "bert":
        args = write_bert_vocab(tmp_path / "vocab.txt")
        tok = build_tokenizer("BertWordPieceLowerCase", vocab_file=args[-1])
        assert tok.eos_id == tok.pad_id == 0
    else:
        args = SP_ARGS
        tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    prefixes = {
        "plain": preprocess_jsonl(corpus, tmp_path / "plain", args, eod=False),
        "eod": preprocess_jsonl(corpus, tmp_path / "eod", args, eod=True),
    }
    halves = [
        preprocess_jsonl(first, tmp_path / "first", args, eod=True),
        preprocess_jsonl(second, tmp_path / "second", args, eod=False),
    ]
    prefixes["mixed"] = str(tmp_path / "mixed")
    check_tool("tools/merge_datasets.py", "--input", *halves, "--output-prefix", prefixes["mixed"])
    assert IndexedDataset(prefixes["eod"])[0][-1] == tok.eos_id  # the tool did append it
    n = 64
    built = {
        name: GLMDataset(prefix, (0, 120), n, seed=3, cls_id=tok.cls_id, eos_id=tok.eos_id)
        for name, prefix in prefixes.items()
    }
    assert not built["plain"].stored_eos.any() and built["eod"].stored_eos.all()
    assert built["mixed"].stored_eos.tolist() == [True] * 60 + [False] * 60
    plain = built["plain"]
    doc_order, _, shuffle = plain._epoch(0)
    encoded = [tok.encode(text) for text in texts]
    stream = np.concatenate([[tok.cls_id, *encoded[d], tok.eos_id] for d in doc_order])
    inverse = np.argsort(shuffle)
    for j in range(plain.samples_per_epoch):
        text = plain[int(inverse[j])]["text"]
        assert np.array_equal(text, expected_window(stream, j, n, tok.cls_id, tok.eos_id)), j
    for name in ("eod", "mixed"):
        ds = built[name]
        assert ds.samples_per_epoch == plain.samples_per_epoch
        for i in range(2 * plain.samples_per_epoch):  # two epochs
            assert np.array_equal(ds[i]["text"], plain[i]["text"]), (name, i)
    # every document end in every sample is exactly one [eos] followed by the next [CLS]
    for i in range(plain.samples_per_epoch):
        text = built["eod"][i]["text"]
        eos_at = np.flatnonzero(text == tok.eos_id)
        assert np.all(text[eos_at[eos_at + 1 < n] + 1] == tok.cls_id), i


# -- splits: build only what a run uses; check_splits --------------------------------------------


@pytest.fixture(scope="module")
def pydocs_like(tmp_path_factory) -> tuple[str, list[str]]:
    """600 generated paragraphs preprocessed with --append-eod as in the quickstart: with the
    default --split 949,50,1 the test split gets one short document."""
    root = tmp_path_factory.mktemp("splits")
    texts = write_paragraphs(root / "corpus.jsonl", 600, seed=7)
    return preprocess_jsonl(root / "corpus.jsonl", root / "corpus", SP_ARGS, eod=True), texts


def sp_config(prefix: str, **kw) -> DataConfig:
    return DataConfig(
        data_path=[prefix],
        seq_length=kw.pop("seq_length", 512),
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=SP_MODEL,
        **kw,
    )


def test_a_short_unused_split_does_not_stop_a_run(tmp_path, pydocs_like, caplog):
    prefix, texts = pydocs_like
    cfg = sp_config(prefix, index_cache_dir=str(tmp_path / "cache"))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=SP_MODEL)
    assert [hi - lo for lo, hi in split_document_ranges(600, cfg.split_fractions)] == [569, 30, 1]
    assert check_splits(cfg, ["train"]) == [] and check_splits(cfg, ["train", "valid"]) == []
    # one message, exact: the stored [eos] of the test document is not counted twice (the check
    # builds the configured tokenizer to learn its eos id)
    tokens = len(tok.encode(texts[-1])) + 2
    message = (
        f"{prefix}: the test split (1 document, {tokens} tokens with [CLS]/[eos]) is shorter than "
        "one raw sample of 512 tokens (--seq-length 512); add documents, give the test split a "
        "larger share in --split (now 949,50,1), or use a shorter --seq-length"
    )
    assert check_splits(cfg, ("train", "valid", "test")) == [message]
    assert check_splits(cfg, {"test"}, eos_id=tok.eos_id) == [message]
    with caplog.at_level(logging.INFO, logger="megatron_glm.data.glm_dataset"):
        train, valid, test = build_glm_datasets(cfg, tok, (100, 0, 0), splits=("train",))
    assert valid is None and test is None and len(train) >= 100
    notes = [r.getMessage() for r in caplog.records if "not built" in r.getMessage()]
    assert notes == [f"{message.split(';')[0]}; not built: this run does not use it"]
    cached = os.listdir(tmp_path / "cache")
    assert sum(f.endswith("_e0_docs.npy") for f in cached) == 1, "only the train index is built"
    train, valid, _ = build_glm_datasets(cfg, tok, (100, 20, 0), splits=("train", "valid"))
    assert valid.document_range == (569, 599)
    with pytest.raises(ValueError) as err:  # the same message where the split is needed
        build_glm_datasets(cfg, tok, (100, 0, 5), splits=("train", "test"))
    assert str(err.value) == message
    # a needed split without documents, and the advice for it
    no_valid = sp_config(prefix, split="1,0,0")
    assert check_splits(no_valid, ["train", "valid"]) == [
        f"{prefix}: the valid split gets 0 of the dataset's 600 documents; give it a share in "
        "--split (now 1,0,0) or add documents"
    ]


def test_split_check_and_dataset_agree_at_the_boundary(tmp_path):
    """A split of exactly n packed tokens gives one sample, of n - 1 none; the stored [eos] of a
    document counts once. check_splits and GLMDataset use the same arithmetic."""
    prefix = str(tmp_path / "docs")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document([20, 21, 22, 23, EOS])  # stores its [eos]: 4 text tokens
        builder.add_document([30, 31, 32], lengths=[2, 1])  # two sequences, no [eos]
    packed = (4 + 2) + (3 + 2)
    for n, fits in ((packed, True), (packed + 1, False)):
        cfg = data_config([prefix], seq_length=n, split="1,0,0")
        problems = check_splits(cfg, ["train"], eos_id=EOS)
        if fits:
            assert problems == []
            ds = GLMDataset(prefix, (0, 2), n, seed=0, cls_id=CLS, eos_id=EOS)
            assert ds.samples_per_epoch == 1 and ds.stored_eos.tolist() == [True, False]
            order = ds._epoch(0)[0].tolist()
            units = {0: [CLS, 20, 21, 22, 23, EOS], 1: [CLS, 30, 31, 32, EOS]}
            assert ds[0]["text"].tolist() == units[order[0]] + units[order[1]]
        else:
            assert problems == [
                f"{prefix}: the train split (2 documents, {packed} tokens with [CLS]/[eos]) is "
                f"shorter than one raw sample of {n} tokens (--seq-length {n}); add documents, "
                "give the train split a larger share in --split (now 1,0,0), or use a shorter "
                "--seq-length"
            ]
            with pytest.raises(ValueError, match=f"{packed} tokens with .* of {n} tokens"):
                GLMDataset(prefix, (0, 2), n, seed=0, cls_id=CLS, eos_id=EOS)


def test_an_empty_dataset_is_refused_by_name(tmp_path):
    """0 documents (what preprocess_data.py used to write for a --json-keys typo): a clear
    ValueError before anything else, also inside a blend, never a TypeError later."""
    empty, good = str(tmp_path / "empty"), str(tmp_path / "good")
    IndexedDatasetBuilder(empty, np.uint16).finalize()
    write_toy_dataset(good, 30, seed=0)
    expected = f"{empty}: empty dataset ({empty}.idx lists 0 documents)"
    for paths in ([empty], ["0.5", good, "0.5", empty]):
        cfg = data_config(paths)
        (problem,) = check_splits(cfg, ["train"])
        assert problem.startswith(expected) and "--data-path" in problem
        with pytest.raises(ValueError, match="empty dataset"):
            build_glm_datasets(cfg, ToyTokenizer(), (10, 0, 0), splits=("train",))
    with pytest.raises(ValueError, match="unknown split names"):
        check_splits(data_config([good]), ["training"])
