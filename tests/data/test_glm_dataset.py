"""GLM raw samples: packing, split by documents, blending, the cached sample index, any-index access."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_glm.config.data import BlankInfillingConfig, DataConfig
from megatron_glm.data.glm_dataset import (
    BlendedDataset,
    GLMDataset,
    build_glm_datasets,
    split_document_ranges,
)
from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder
from tests.data.test_blank_infilling import ToyTokenizer, toy_document

CLS, EOS = ToyTokenizer.cls_id, ToyTokenizer.eos_id


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
        start = j * (n - 1)
        start += int(stream[start] == EOS)  # never open on an [eos]
        window = (
            stream[start : start + n]
            if stream[start] == CLS
            else np.concatenate(([CLS], stream[start : start + n - 1]))
        )
        assert np.array_equal(text, window), j
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
    assert (
        build_glm_datasets(data_config([prefix], split="1,0,0"), ToyTokenizer(), (5, 5, 5))[1]
        is None
    )


def test_blending_weights_and_determinism(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_toy_dataset(a, 50, seed=2, tag_base=1000)
    write_toy_dataset(b, 50, seed=3, tag_base=3000)
    cfg = data_config(["0.3", a, "0.7", b], split="1,0,0")
    train, valid, test = build_glm_datasets(cfg, ToyTokenizer(), num_samples=(1000, 0, 0))
    assert isinstance(train, BlendedDataset) and valid is None and test is None
    from_a = np.array([int(train[i]["text"].max()) < 3000 for i in range(1000)])
    counts = np.cumsum(from_a)
    expected = 0.3 * np.arange(1, 1001)
    assert np.max(np.abs(counts - expected)) <= 1.0, "every prefix within one sample of its share"
    again = build_glm_datasets(cfg, ToyTokenizer(), num_samples=(10, 0, 0))[0]
    for i in (0, 17, 999, 5000):  # a shorter build and an index beyond the requested size agree
        assert np.array_equal(train[i]["text"], again[i]["text"]) and train[i]["index"] == i
    weights = BlendedDataset([train.datasets[0], train.datasets[1]], [1.0, 3.0], 400)
    assert int((weights.dataset_index == 0).sum()) == 100


def test_cache_is_reused_and_keyed_by_parameters(tmp_path):
    prefix = str(tmp_path / "docs")
    write_toy_dataset(prefix, 40, seed=4)
    cache = str(tmp_path / "cache")
    first = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert first.built_epochs == [0]
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and all(f.endswith(".npy") for f in files)
    mtimes = [os.path.getmtime(os.path.join(cache, f)) for f in files]
    second = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS, cache_dir=cache)
    assert second.built_epochs == [], "second build loads the cached index"
    assert [os.path.getmtime(os.path.join(cache, f)) for f in files] == mtimes
    assert np.array_equal(first[3]["text"], second[3]["text"])
    for other in (dict(seed=10), dict(raw_length=47), dict(document_range=(0, 39))):
        args = dict(prefix=prefix, document_range=(0, 40), raw_length=48, seed=9) | other
        ds = GLMDataset(cls_id=CLS, eos_id=EOS, cache_dir=cache, **args)
        assert ds.built_epochs == [0] and ds.cache_key != first.cache_key
    for f in os.listdir(cache):  # plain arrays, loadable without pickle
        np.load(os.path.join(cache, f), allow_pickle=False)
    default = GLMDataset(prefix, (0, 40), 48, seed=9, cls_id=CLS, eos_id=EOS)
    assert os.path.isfile(default.cache_paths(0)["docs"]) and default.cache_paths(0)[
        "docs"
    ].startswith(str(tmp_path)), "cached next to the data by default"


def test_raw_length_follows_the_fixed_shape_plan_and_errors(tmp_path):
    prefix = str(tmp_path / "docs")
    write_toy_dataset(prefix, 10, seed=5, max_len=20)
    cfg = data_config([prefix], seq_length=128, split="1,0,0")
    train = build_glm_datasets(cfg, ToyTokenizer(), (4, 0, 0))[0]
    assert train[0]["text"].size == cfg.raw_sample_length < 128
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


def test_show_samples_tool_end_to_end(tmp_path, capsys):
    """The tool with a real tokenizer (tiny WordPiece vocabulary) over a real indexed dataset."""
    import json

    from megatron_glm.data.tokenizers import build_tokenizer
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
    assert main(common) == 0
    text = capsys.readouterr().out
    assert text.count("sample ") == 6 and "Part A:" in text and "Part B" in text
    assert main(common + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 6 and {r["objective"] for r in rows} <= {"bert", "sentence", "gpt"}
    for r in rows:
        assert len(r["tokens"]) == len(r["targets"]) == len(r["loss_mask"]) == 64
        assert len(r["position_ids"]) == 2 and r["tokens"][0] == tok.cls_id
        assert r["tokens"][r["length"] :] == [tok.pad_id] * (64 - r["length"])
