"""Megatron-compatible indexed dataset: ``prefix.bin`` (token ids) + ``prefix.idx`` (index).

Layout of ``prefix.idx`` (docs/data-formats.md#indexed-dataset-format; little endian;
byte-compatible with Megatron-Core's ``MMIDIDX`` format, so either side reads the other's files)::

    offset  size        field
    0       9           magic b"MMIDIDX\\x00\\x00"
    9       8           version, uint64 = 1
    17      1           dtype code, uint8 (see DTYPE_CODES)
    18      8           sequence count S, uint64
    26      8           document-index count D, uint64 (number of documents + 1)
    34      4*S         sizes, int32: tokens per sequence
    34+4S   8*S         pointers, int64: byte offset of each sequence in prefix.bin
    34+12S  8*D         document_indices, int64: sequence index where each document starts,
                        first 0, last S (one sequence per document: 0..S)

``prefix.bin`` holds the sequences back to back in the dataset dtype. Both files are validated
when the dataset is opened (a corrupt or truncated file fails at open, naming the file and the
mismatch), so a training job never discovers a broken dataset hours in.

The builder writes to temporary names and renames at ``finalize()``: an interrupted build never
leaves a pair of files that looks complete.
"""

from __future__ import annotations

import array
import logging
import mmap
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# Megatron's threshold: ids < 65500 fit uint16 with room to spare.
UINT16_VOCAB_LIMIT = 65500


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, corrupt, truncated or not what the caller expected."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def best_dtype(vocab_size: int) -> np.dtype:
    """Smallest token dtype for ``vocab_size`` ids: uint16 below 65,500, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def dtype_code(dtype: Any) -> int:
    """The ``.idx`` code of ``dtype``; ``ValueError`` for a dtype the format cannot store."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        raise ValueError(
            f"dtype {dt} is not storable in an indexed dataset; use one of "
            f"{sorted(str(d) for d in _CODE_OF_DTYPE)}"
        )
    return _CODE_OF_DTYPE[dt]


class IndexedDataset:
    """Memory-mapped reader of ``prefix.bin``/``prefix.idx``.

    ``dataset[i]`` is sequence ``i`` as a read-only numpy view into the mapped ``.bin`` (no copy;
    with ``mmap=False`` it is read from the file instead). ``dtype`` (optional) is what the caller
    expects the file to hold; a different dtype in the file is an error.
    """

    def __init__(self, prefix: str, mmap: bool = True, dtype: Any = None) -> None:
        self.path_prefix = str(prefix)
        self.mmap = mmap
        self._expected_dtype = None if dtype is None else np.dtype(dtype)
        self._open()

    # ---- opening and validation -------------------------------------------------------------

    def _open(self) -> None:
        idx_path = index_file_path(self.path_prefix)
        bin_path = data_file_path(self.path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file {path} does not exist")
        self._idx_map = _map_file(idx_path)
        if self._idx_map is None:
            raise IndexedDatasetError(f"{idx_path}: index file is empty (0 bytes)")
        idx = memoryview(self._idx_map)
        dtype, seq_count, doc_count = _parse_header(idx, idx_path)
        if self._expected_dtype is not None and dtype != self._expected_dtype:
            raise IndexedDatasetError(
                f"{idx_path}: file holds dtype {dtype}, caller expects {self._expected_dtype}"
            )
        self.dtype = dtype
        off = HEADER_SIZE
        self.sizes = np.frombuffer(idx, dtype="<i4", count=seq_count, offset=off)
        off += 4 * seq_count
        self.pointers = np.frombuffer(idx, dtype="<i8", count=seq_count, offset=off)
        off += 8 * seq_count
        self.document_indices = np.frombuffer(idx, dtype="<i8", count=doc_count, offset=off)
        self.num_tokens = _validate_index(
            self.sizes, self.pointers, self.document_indices, dtype.itemsize, idx_path
        )

        bin_size = os.path.getsize(bin_path)
        expected = self.num_tokens * dtype.itemsize
        if bin_size != expected:
            detail = "is empty (0 bytes)" if bin_size == 0 else f"has {bin_size} bytes"
            if bin_size % dtype.itemsize:
                detail += f", not a multiple of the {dtype} item size {dtype.itemsize}"
            raise IndexedDatasetError(
                f"{bin_path}: data file {detail}; the index {idx_path} describes "
                f"{self.num_tokens} tokens of {dtype} = {expected} bytes"
                + (" (truncated?)" if bin_size < expected else "")
            )
        self._bin_map = _map_file(bin_path) if mmap else None
        self._tokens = (
            np.frombuffer(self._bin_map, dtype=dtype.newbyteorder("<"))
            if self._bin_map is not None
            else np.empty(0, dtype=dtype)
        )
        logger.debug(
            "opened %s: %d sequences, %d documents, %d tokens of %s",
            self.path_prefix,
            len(self),
            self.num_documents,
            self.num_tokens,
            dtype,
        )

    # ---- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.shape[0]) - 1

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self.get(i) for i in range(*index.indices(len(self)))]
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``index`` (to its end when ``length`` is
        None)."""
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(
                f"sequence index {index} out of range for {n} sequences in {self.path_prefix}"
            )
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(
                f"offset {offset} + length {length} outside sequence {i} of "
                f"{size} tokens in {self.path_prefix}"
            )
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        if self._bin_map is not None:
            return self._tokens[start : start + length]
        with open(data_file_path(self.path_prefix), "rb") as f:
            f.seek(start * self.dtype.itemsize)
            return np.fromfile(f, dtype=self.dtype.newbyteorder("<"), count=length)

    def document_sequences(self, document: int) -> range:
        """Indices of the sequences of document ``document``."""
        return range(int(self.document_indices[document]), int(self.document_indices[document + 1]))

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))

    # Pickled for DataLoader workers started with spawn: reopen (and revalidate) by name.
    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.path_prefix, "mmap": self.mmap, "dtype": self._expected_dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"], mmap=state["mmap"], dtype=state["dtype"])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
            f"documents={self.num_documents}, tokens={self.num_tokens}, dtype={self.dtype})"
        )


def _map_file(path: str) -> mmap.mmap | None:
    """Read-only mapping of ``path``; None for an empty file (which cannot be mapped)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _parse_header(idx: memoryview, idx_path: str) -> tuple[np.dtype, int, int]:
    nbytes = len(idx)
    if nbytes < len(INDEX_MAGIC) or bytes(idx[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: bad magic {bytes(idx[: len(INDEX_MAGIC)])!r}, expected {INDEX_MAGIC!r} "
            "(not a Megatron MMIDIDX index file)"
        )
    if nbytes < HEADER_SIZE:
        raise IndexedDatasetError(f"{idx_path}: truncated header, {nbytes} bytes < {HEADER_SIZE}")
    version, code, seq_count, doc_count = struct.unpack_from("<QBQQ", idx, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise IndexedDatasetError(
            f"{idx_path}: unsupported index version {version}, expected {INDEX_VERSION}"
        )
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{idx_path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}"
        )
    expected = HEADER_SIZE + 12 * seq_count + 8 * doc_count
    if nbytes != expected:
        hint = ""
        if nbytes == expected + seq_count:
            hint = " (the extra bytes look like Megatron multimodal sequence modes: unsupported)"
        raise IndexedDatasetError(
            f"{idx_path}: index file has {nbytes} bytes, but its header ({seq_count} sequences, "
            f"{doc_count} document indices) requires {expected}{hint}"
        )
    return DTYPE_CODES[code], seq_count, doc_count


def _validate_index(
    sizes: np.ndarray,
    pointers: np.ndarray,
    document_indices: np.ndarray,
    itemsize: int,
    idx_path: str,
) -> int:
    """Check the three index arrays against each other; return the total number of tokens."""
    seq_count = sizes.shape[0]
    if seq_count and int(sizes.min()) < 0:
        bad = int(np.argmax(sizes < 0))
        raise IndexedDatasetError(f"{idx_path}: negative size {int(sizes[bad])} of sequence {bad}")
    ends = np.cumsum(sizes, dtype=np.int64) * itemsize  # byte end of each sequence
    if seq_count:
        expected = np.empty_like(ends)
        expected[0] = 0
        expected[1:] = ends[:-1]
        wrong = np.flatnonzero(pointers != expected)
        if wrong.size:
            i = int(wrong[0])
            raise IndexedDatasetError(
                f"{idx_path}: pointer of sequence {i} is {int(pointers[i])}, but the sizes place "
                f"it at byte {int(expected[i])} (pointers and sizes are inconsistent)"
            )
    if document_indices.shape[0] == 0:
        raise IndexedDatasetError(f"{idx_path}: no document indices (expected at least [0])")
    if int(document_indices[0]) != 0 or int(document_indices[-1]) != seq_count:
        raise IndexedDatasetError(
            f"{idx_path}: document_indices must start at 0 and end at the sequence count "
            f"{seq_count}, got first {int(document_indices[0])}, last {int(document_indices[-1])}"
        )
    steps = np.diff(document_indices)
    if steps.size and int(steps.min()) < 0:
        i = int(np.argmax(steps < 0))
        raise IndexedDatasetError(
            f"{idx_path}: document_indices decrease at document {i}: "
            f"{int(document_indices[i])} -> {int(document_indices[i + 1])}"
        )
    return int(ends[-1]) // itemsize if seq_count else 0


class IndexedDatasetBuilder:
    """Writes ``prefix.bin``/``prefix.idx``; nothing carries the final names before ``finalize()``.

    Use as a context manager (an exception deletes the temporary files) or call ``finalize()`` /
    ``abort()`` yourself. Token ids are range-checked against ``dtype`` so an id that would wrap
    around (e.g. 70000 in uint16) is an error, not silent corruption.
    """

    def __init__(self, prefix: str, dtype: Any = np.int32) -> None:
        self.path_prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if self.dtype.kind not in "iu":
            raise ValueError(f"token dtype must be an integer type, got {self.dtype}")
        self._info = np.iinfo(self.dtype)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = data_file_path(self.path_prefix) + tag
        self._tmp_idx = index_file_path(self.path_prefix) + tag
        os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed by finalize/abort)
        self._sizes = array.array("q")
        self._document_indices = array.array("q", [0])
        self._done = False
        self._owner_pid = os.getpid()

    def _as_tokens(self, ids: Any) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype == self.dtype:
            return arr.reshape(-1)
        if arr.size == 0:
            return np.empty(0, dtype=self.dtype)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < self._info.min or hi > self._info.max:
            raise ValueError(
                f"token ids span [{lo}, {hi}], which does not fit {self.dtype} "
                f"for {self.path_prefix}; use a wider dtype (best_dtype(vocab_size))"
            )
        return arr.astype(self.dtype).reshape(-1)

    def _write(self, tokens: np.ndarray) -> None:
        if self._done:
            raise RuntimeError(f"builder for {self.path_prefix} is already finalized or aborted")
        self._bin.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())

    def add_item(self, ids: Any) -> None:
        """Append one sequence (call ``end_document()`` after a document's last sequence)."""
        tokens = self._as_tokens(ids)
        self._write(tokens)
        self._sizes.append(tokens.size)

    def end_document(self) -> None:
        self._document_indices.append(len(self._sizes))

    def add_document(self, ids: Any, lengths: Sequence[int] | None = None) -> None:
        """Append one document: ``ids`` split into sequences of ``lengths`` (one sequence when
        None)."""
        tokens = self._as_tokens(ids)
        if lengths is None:
            lengths = [tokens.size]
        if sum(lengths) != tokens.size or any(n < 0 for n in lengths):
            raise ValueError(
                f"sequence lengths {list(lengths)} do not partition the "
                f"{tokens.size} tokens of the document"
            )
        self._write(tokens)
        self._sizes.extend(int(n) for n in lengths)
        self.end_document()

    def add_documents(
        self, tokens: np.ndarray, sequence_lengths: np.ndarray, document_ends: np.ndarray
    ) -> None:
        """Bulk append: ``tokens`` is many sequences back to back (``sequence_lengths`` each);
        ``document_ends[k]`` is the number of these sequences up to the end of document k."""
        tokens = self._as_tokens(tokens)
        sequence_lengths = np.asarray(sequence_lengths, dtype=np.int64)
        document_ends = np.asarray(document_ends, dtype=np.int64)
        if int(sequence_lengths.sum()) != tokens.size or (sequence_lengths < 0).any():
            raise ValueError(
                f"sequence lengths (sum {int(sequence_lengths.sum())}) do not "
                f"partition the {tokens.size} tokens"
            )
        last_end = int(document_ends[-1]) if document_ends.size else 0
        if last_end != sequence_lengths.size or (np.diff(document_ends, prepend=0) < 0).any():
            raise ValueError(
                f"document_ends must be non-decreasing and end at the "
                f"{sequence_lengths.size} sequences, got {document_ends.tolist()}"
            )
        base = len(self._sizes)
        self._write(tokens)
        self._sizes.frombytes(sequence_lengths.astype("<i8").tobytes())
        self._document_indices.frombytes((document_ends + base).astype("<i8").tobytes())

    def add_index(self, other_prefix: str) -> None:
        """Append every sequence and document of the dataset at ``other_prefix`` (validated)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"cannot merge {other_prefix} (dtype {other.dtype}) into "
                f"{self.path_prefix} (dtype {self.dtype})"
            )
        if self._done:
            raise RuntimeError(f"builder for {self.path_prefix} is already finalized or aborted")
        base = len(self._sizes)
        self._sizes.frombytes(other.sizes.astype("<i8").tobytes())
        self._document_indices.frombytes(
            (other.document_indices[1:] + base).astype("<i8").tobytes()
        )
        del other
        with open(data_file_path(other_prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=16 << 20)

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        if self._done:
            raise RuntimeError(f"builder for {self.path_prefix} is already finalized or aborted")
        if self._document_indices[-1] != len(self._sizes):
            # Sequences added with add_item but no end_document(): they form the last document.
            self.end_document()
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else np.zeros(0, np.int64)
        if sizes.size and int(sizes.max()) > np.iinfo(np.int32).max:
            raise ValueError(
                f"a sequence of {int(sizes.max())} tokens exceeds the int32 sizes "
                "field of the index format"
            )
        pointers = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._document_indices, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<QBQQ", INDEX_VERSION, self._code, sizes.size, doc_idx.size))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
        # Remove a stale index first: a crash between the two renames then leaves a .bin with no
        # .idx (incomplete, never opened) instead of a new .bin paired with an old .idx.
        idx_path = index_file_path(self.path_prefix)
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(self._tmp_bin, data_file_path(self.path_prefix))
        os.replace(self._tmp_idx, idx_path)
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporary files (nothing is written under the final names)."""
        if self._done:
            return
        self._done = True
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    def __del__(self) -> None:
        # A builder dropped without finalize() (e.g. a killed worker loop) leaves no temp files.
        # Only the creating process: a forked child holding a copy must not delete its files.
        if not getattr(self, "_done", True) and self._owner_pid == os.getpid():
            self.abort()


def merge_datasets(prefixes: Iterable[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets (sequences and documents, in order) into ``output_prefix``."""
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("merge_datasets needs at least one input prefix")
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise ValueError(f"output prefix {output_prefix} is also an input")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetBuilder(output_prefix, first.dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
    return IndexedDataset(output_prefix)
