"""IndexedDataset / IndexedDatasetBuilder: round trips, Megatron-Core compatibility, validation of
corrupt files at open, atomic output."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from megatron_glm.data.indexed_dataset import (
    HEADER_SIZE,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_dtype,
    merge_datasets,
)


def random_documents(seed: int, num_docs: int = 20, vocab: int = 60000) -> list[list[np.ndarray]]:
    """Documents as lists of sequences (some empty, some multi-sequence)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        num_seqs = int(rng.integers(1, 4))
        docs.append(
            [rng.integers(0, vocab, size=int(rng.integers(0, 50))) for _ in range(num_seqs)]
        )
    return docs


def write_documents(prefix: str, docs: list[list[np.ndarray]], dtype: np.dtype) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        for k, doc in enumerate(docs):
            if k % 3 == 0:
                builder.add_document(np.concatenate(doc), lengths=[len(s) for s in doc])
            elif k % 3 == 1:
                for seq in doc:
                    builder.add_item(seq.tolist())
                builder.end_document()
            else:
                lengths = np.array([len(s) for s in doc])
                builder.add_documents(np.concatenate(doc), lengths, np.array([len(doc)]))


def expected_document_indices(docs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(d) for d in docs])])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = random_documents(0)
    prefix = str(tmp_path / "ds")
    write_documents(prefix, docs, np.dtype(dtype))
    seqs = [s for d in docs for s in d]
    for mmap in (True, False):
        ds = IndexedDataset(prefix, mmap=mmap)
        assert ds.dtype == np.dtype(dtype)
        assert len(ds) == len(seqs)
        np.testing.assert_array_equal(ds.sizes, [len(s) for s in seqs])
        np.testing.assert_array_equal(ds.document_indices, expected_document_indices(docs))
        assert ds.num_tokens == sum(len(s) for s in seqs)
        for i, seq in enumerate(seqs):
            np.testing.assert_array_equal(ds[i], seq)
            assert ds[i].dtype == np.dtype(dtype)
        assert ds.num_documents == len(docs)
        np.testing.assert_array_equal(ds[-1], seqs[-1])
    with pytest.raises(IndexError):
        ds[len(seqs)]


def test_views_are_zero_copy_and_read_only(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document(np.arange(10))
        builder.add_document(np.arange(10, 30))
    ds = IndexedDataset(prefix)
    a, b = ds[0], ds[1]
    assert not a.flags.owndata and not a.flags.writeable
    # Both sequences are windows of the one mapped buffer, back to back.
    assert a.__array_interface__["data"][0] + 20 == b.__array_interface__["data"][0]
    np.testing.assert_array_equal(ds.get(1, offset=3, length=4), [13, 14, 15, 16])
    np.testing.assert_array_equal(ds.get(1, offset=18), [28, 29])
    with pytest.raises(ValueError, match="outside sequence 1"):
        ds.get(1, offset=15, length=6)


def test_pickle_reopens_by_name(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        builder.add_document([5, 6, 7])
    payload = pickle.dumps(IndexedDataset(prefix))
    assert len(payload) < 300  # the prefix, not the data
    np.testing.assert_array_equal(pickle.loads(payload)[0], [5, 6, 7])


def test_best_dtype():
    assert best_dtype(30592) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(150_000) == np.int32


def test_builder_rejects_ids_that_do_not_fit(tmp_path):
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    with pytest.raises(ValueError, match="does not fit uint16"):
        builder.add_item([1, 70000])
    with pytest.raises(ValueError, match="does not fit uint16"):
        builder.add_item([-1])
    builder.abort()
    assert os.listdir(tmp_path) == []


def test_builder_is_atomic(tmp_path):
    prefix = str(tmp_path / "ds")
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    builder.add_document([1, 2, 3])
    assert not IndexedDataset.exists(prefix)
    assert not any(name in ("ds.bin", "ds.idx") for name in os.listdir(tmp_path))
    builder.finalize()
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]

    # An exception inside the context leaves the previous complete dataset untouched and no temps.
    with pytest.raises(RuntimeError, match="boom"), IndexedDatasetBuilder(prefix, np.uint16) as b:
        b.add_document([9, 9, 9, 9])
        raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])


def test_add_index_and_merge(tmp_path):
    docs_a, docs_b = random_documents(1, 5), random_documents(2, 7)
    write_documents(str(tmp_path / "a"), docs_a, np.dtype(np.uint16))
    write_documents(str(tmp_path / "b"), docs_b, np.dtype(np.uint16))
    merged = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    docs = docs_a + docs_b
    seqs = [s for d in docs for s in d]
    assert len(merged) == len(seqs)
    for i, seq in enumerate(seqs):
        np.testing.assert_array_equal(merged[i], seq)
    np.testing.assert_array_equal(merged.document_indices, expected_document_indices(docs))

    write_documents(str(tmp_path / "c"), docs_a, np.dtype(np.int32))
    with pytest.raises(ValueError, match="dtype int32"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "m2"))
    assert not IndexedDataset.exists(str(tmp_path / "m2"))


# ---- Megatron-Core compatibility -----------------------------------------------------------------


def _megatron_indexed_dataset():
    try:
        from megatron.core.datasets import indexed_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"megatron.core is not importable ({err}); install megatron-core (dev extra)")
    return indexed_dataset


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_core_reads_our_files(tmp_path, dtype):
    mc = _megatron_indexed_dataset()
    docs = random_documents(3)
    prefix = str(tmp_path / "ours")
    write_documents(prefix, docs, np.dtype(dtype))
    theirs = mc.IndexedDataset(prefix)
    seqs = [s for d in docs for s in d]
    assert len(theirs) == len(seqs)
    for i, seq in enumerate(seqs):
        got = theirs[i]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, seq)
    np.testing.assert_array_equal(theirs.document_indices, expected_document_indices(docs))
    np.testing.assert_array_equal(theirs.sequence_lengths, [len(s) for s in seqs])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_we_read_megatron_core_files(tmp_path, dtype):
    import torch

    mc = _megatron_indexed_dataset()
    docs = random_documents(4)
    prefix = str(tmp_path / "theirs")
    builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for k, doc in enumerate(docs):
        if k % 2:
            builder.add_document(torch.from_numpy(np.concatenate(doc)), [len(s) for s in doc])
        else:
            for seq in doc:
                builder.add_item(torch.from_numpy(seq))
            builder.end_document()
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix, dtype=dtype)
    seqs = [s for d in docs for s in d]
    assert len(ours) == len(seqs)
    for i, seq in enumerate(seqs):
        np.testing.assert_array_equal(ours[i], seq)
    np.testing.assert_array_equal(ours.document_indices, expected_document_indices(docs))
    with open(prefix + ".idx", "rb") as f:
        theirs_idx = f.read()
    # Byte-identical index when we write the same content.
    write_documents(str(tmp_path / "ours"), docs, np.dtype(dtype))
    with open(str(tmp_path / "ours.idx"), "rb") as f:
        assert f.read() == theirs_idx


# ---- corrupt inputs are rejected at open ---------------------------------------------------------


@pytest.fixture
def good_prefix(tmp_path) -> str:
    """Three sequences of uint16 (sizes 3, 2, 4) in two documents."""
    prefix = str(tmp_path / "good")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_document([1, 2, 3, 4, 5], lengths=[3, 2])
        builder.add_document([6, 7, 8, 9])
    return prefix


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path: str, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(nbytes)


SIZES_AT = HEADER_SIZE  # int32[3]
POINTERS_AT = HEADER_SIZE + 12  # int64[3]
DOCS_AT = HEADER_SIZE + 12 + 24  # int64[3]

CORRUPTIONS = {
    # name: (file suffix, mutation, expected message fragment)
    "bin_truncated_even": (".bin", lambda p: _truncate(p, 16), "has 16 bytes"),
    "bin_truncated_odd": (".bin", lambda p: _truncate(p, 17), "not a multiple of the uint16"),
    "bin_empty": (".bin", lambda p: _truncate(p, 0), "is empty"),
    "bin_too_long": (".bin", lambda p: _patch(p, 18, b"\x00\x00"), "has 20 bytes"),
    "idx_empty": (".idx", lambda p: _truncate(p, 0), "is empty"),
    "idx_truncated_header": (".idx", lambda p: _truncate(p, 20), "truncated header"),
    "idx_truncated_arrays": (".idx", lambda p: _truncate(p, HEADER_SIZE + 10), "requires"),
    "wrong_magic": (".idx", lambda p: _patch(p, 0, b"TNTIDX\x00\x00\x00"), "bad magic"),
    "wrong_version": (".idx", lambda p: _patch(p, 9, struct.pack("<Q", 2)), "version 2"),
    "unknown_dtype_code": (".idx", lambda p: _patch(p, 17, b"\x09"), "unknown dtype code 9"),
    "seq_count_too_big": (".idx", lambda p: _patch(p, 18, struct.pack("<Q", 4)), "requires"),
    "negative_size": (
        ".idx",
        lambda p: _patch(p, SIZES_AT + 4, struct.pack("<i", -2)),
        "negative size -2 of sequence 1",
    ),
    "size_pointer_mismatch": (
        ".idx",
        lambda p: _patch(p, SIZES_AT, struct.pack("<i", 4)),
        "pointer of sequence 1",
    ),
    "pointer_past_end": (
        ".idx",
        lambda p: _patch(p, POINTERS_AT + 16, struct.pack("<q", 4096)),
        "pointer of sequence 2 is 4096",
    ),
    "first_pointer_not_zero": (
        ".idx",
        lambda p: _patch(p, POINTERS_AT, struct.pack("<q", 2)),
        "pointer of sequence 0 is 2",
    ),
    "last_sequence_past_end": (
        ".idx",
        lambda p: _patch(p, SIZES_AT + 8, struct.pack("<i", 9)),
        "truncated",
    ),
    "doc_indices_not_starting_at_0": (
        ".idx",
        lambda p: _patch(p, DOCS_AT, struct.pack("<q", 1)),
        "start at 0",
    ),
    "doc_indices_wrong_end": (
        ".idx",
        lambda p: _patch(p, DOCS_AT + 16, struct.pack("<q", 2)),
        "last 2",
    ),
    "doc_indices_decreasing": (
        ".idx",
        lambda p: _patch(p, DOCS_AT + 8, struct.pack("<q", 5)),
        "decrease",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_files_rejected_at_open(good_prefix, name):
    suffix, mutate, fragment = CORRUPTIONS[name]
    IndexedDataset(good_prefix)  # intact before the mutation
    mutate(good_prefix + suffix)
    with pytest.raises(IndexedDatasetError) as info:
        IndexedDataset(good_prefix)
    message = str(info.value)
    assert fragment in message
    assert good_prefix in message  # names the file


def test_dtype_mismatch_with_caller(good_prefix):
    IndexedDataset(good_prefix, dtype=np.uint16)
    with pytest.raises(IndexedDatasetError, match="holds dtype uint16, caller expects int32"):
        IndexedDataset(good_prefix, dtype=np.int32)


def test_missing_file(good_prefix):
    os.remove(good_prefix + ".bin")
    with pytest.raises(FileNotFoundError, match="good.bin"):
        IndexedDataset(good_prefix)


def test_add_documents_validates_its_arrays(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "ds"), np.uint16)
    with pytest.raises(ValueError, match="do not partition the 3 tokens"):
        builder.add_documents(np.array([1, 2, 3]), np.array([1, 1]), np.array([2]))
    with pytest.raises(ValueError, match="end at the 2 sequences"):
        builder.add_documents(np.array([1, 2, 3]), np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        builder.add_documents(np.array([1, 2, 3]), np.array([1, 2]), np.array([2, 1, 2]))
    builder.add_documents(np.array([1, 2, 3]), np.array([1, 2]), np.array([1, 2]))
    builder.finalize()
    ds = IndexedDataset(str(tmp_path / "ds"))
    np.testing.assert_array_equal(ds.document_indices, [0, 1, 2])
