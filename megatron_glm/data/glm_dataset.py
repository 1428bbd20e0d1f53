"""Packed raw GLM samples from indexed datasets: split by documents, epochs, blending, cached index.

A dataset's documents, each as the unit ``[CLS] doc [eos]``, are laid end to end in an
epoch-specific random order; sample j of the epoch is the window of the raw length n that starts
at unit position ``j * (n - 1)``: ``[CLS]`` + the next n - 1 tokens, or, when the window starts
exactly at a document's ``[CLS]`` (or at the ``[eos]`` just before it), the n tokens from that
``[CLS]`` on (then the sample's last token or two are also the next sample's first ones). Samples
are shuffled within their epoch. Everything is a pure function of (seed, sample index): ``ds[i]``
works for any i, epoch ``i // samples_per_epoch``.

A document stored with its own trailing ``[eos]`` (``tools/preprocess_data.py --append-eod``) is
packed without it, so every document ends with exactly one ``[eos]`` and a dataset written with or
without ``--append-eod`` gives the same samples. Which documents end with ``[eos]`` is read from
the ``.bin`` (one token per document), not taken from a flag.

The per-epoch index (document order, sample starts as (unit, offset), sample shuffle) and the
per-document ``[eos]`` flags are built once with numpy and cached as ``.npy`` files next to the
data, named by a hash of what determines them. A ``*_sha256.json`` record written after them holds
their sizes and SHA-256 digests (megatron_glm.integrity); a cache whose files do not match their
record, lack one, or have other shapes is rebuilt (with a warning naming the file), never used.

Only the splits a run uses are built (``build_glm_datasets(..., splits=...)``); ``check_splits``
tells, from the ``.idx`` files alone, whether those splits can each give one raw sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

import numpy as np

from megatron_glm.atomic_files import replacing
from megatron_glm.config.data import DataConfig
from megatron_glm.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megatron_glm.integrity import record_files, record_problems

logger = logging.getLogger(__name__)

# Bump when the index layout or its construction changes, so stale caches are never reused.
# 2: a stored trailing [eos] is no longer doubled; a split of exactly n tokens gives one sample.
_INDEX_FORMAT = 2
SPLIT_NAMES = ("train", "valid", "test")
_INDEX_PARTS = ("docs", "samples", "shuffle")


def split_document_ranges(
    num_documents: int, fractions: tuple[float, ...]
) -> list[tuple[int, int]]:
    """Contiguous document ranges per split (no document in two splits); rounding as Megatron."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * num_documents)))
    bounds = [min(b, num_documents) for b in bounds]
    bounds[-1] = num_documents  # rounding drift goes to the last split
    return [(bounds[s], max(bounds[s], bounds[s + 1])) for s in range(len(fractions))]


# -- the arithmetic of a split (shared by check_splits, build_glm_datasets and GLMDataset) ---------


def packed_tokens(doc_lengths: np.ndarray) -> int:
    """Tokens of documents laid end to end as units ``[CLS] doc [eos]``; ``doc_lengths`` count each
    document's text without a stored trailing ``[eos]``."""
    return int(np.sum(doc_lengths, dtype=np.int64)) + 2 * int(np.size(doc_lengths))


def samples_per_epoch(packed: int, raw_length: int) -> int:
    """Raw samples of ``raw_length`` tokens one epoch of ``packed`` tokens gives.

    Window 0 opens at the first ``[CLS]`` and needs ``raw_length`` tokens; window j >= 1 opens at
    ``j * (raw_length - 1)``, one later when that is an ``[eos]``, and must end inside the epoch.
    """
    n = int(raw_length)
    if packed < n:
        return 0
    return 1 + max(0, (packed - n - 1) // (n - 1))


class SplitShortfall(NamedTuple):
    """Why one split of one dataset cannot give a raw sample: what is wrong, and what to do."""

    description: str
    advice: str

    def message(self) -> str:
        return f"{self.description}; {self.advice}"


def split_shortfall(
    prefix: str,
    name: str,
    documents: int,
    packed: int,
    raw_length: int,
    *,
    total_documents: int | None = None,
    split: str | None = None,
) -> SplitShortfall | None:
    """The shortfall of a split of ``documents`` documents and ``packed`` tokens (with
    ``[CLS]``/``[eos]``), None when it gives at least one raw sample of ``raw_length`` tokens."""
    now = f" (now {split})" if split else ""
    if documents == 0:
        of = f" of the dataset's {total_documents}" if total_documents is not None else ""
        return SplitShortfall(
            f"{prefix}: the {name} split gets 0{of} documents",
            f"give it a share in --split{now} or add documents",
        )
    if samples_per_epoch(packed, raw_length) > 0:
        return None
    return SplitShortfall(
        f"{prefix}: the {name} split ({documents} document{'s' * (documents != 1)}, {packed} tokens "
        f"with [CLS]/[eos]) is shorter than one raw sample of {raw_length} tokens "
        f"(--seq-length {raw_length})",
        f"add documents, give the {name} split a larger share in --split{now}, or use a shorter "
        "--seq-length",
    )


def _document_extents(indexed: IndexedDataset, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored tokens of documents ``lo..hi-1`` and each one's end (exclusive) as a token position
    in the ``.bin`` (the pointers are validated running sums, so positions follow from sizes)."""
    bounds = np.asarray(indexed.document_indices[lo : hi + 1], dtype=np.int64)
    first, last = int(bounds[0]), int(bounds[-1])
    within = np.concatenate(([0], np.cumsum(indexed.sizes[first:last], dtype=np.int64)))
    base = int(indexed.pointers[first]) // indexed.dtype.itemsize if first < len(indexed) else 0
    ends = within[bounds[1:] - first]
    return ends - within[bounds[:-1] - first], base + ends


def stored_eos_flags(indexed: IndexedDataset, lo: int, hi: int, eos_id: int) -> np.ndarray:
    """``flags[d]`` is True when document ``lo + d`` ends with a stored ``eos_id`` (as written by
    ``--append-eod``); reads one token per document through a memory map of the ``.bin``.

    Only the eos id is compared: for the BERT tokenizers eos is ``[PAD]`` (id 0, as in the
    official GLM), and a rule such as "ignore pad tokens" would miss exactly those datasets."""
    lengths, ends = _document_extents(indexed, lo, hi)
    flags = np.zeros(lengths.size, dtype=bool)
    nonempty = lengths > 0
    if nonempty.any():
        tokens = np.memmap(
            data_file_path(indexed.path_prefix), dtype=indexed.dtype.newbyteorder("<"), mode="r"
        )
        flags[nonempty] = tokens[ends[nonempty] - 1] == eos_id
        del tokens
    return flags


def _split_names(splits: Collection[str]) -> frozenset[str]:
    names = frozenset(splits)
    unknown = sorted(names - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected some of {list(SPLIT_NAMES)}")
    return names


def _eos_lookup(data_config: DataConfig, eos_id: int | None) -> Callable[[], int | None]:
    """The eos id, or a function that builds the configured tokenizer to learn it the first time
    it is asked (only short splits need it); None when no tokenizer can be built."""
    memo: list[int | None] = [] if eos_id is None else [int(eos_id)]

    def lookup() -> int | None:
        if not memo:
            try:
                from megatron_glm.data.tokenizers import tokenizer_from_spec

                memo.append(int(tokenizer_from_spec(data_config.tokenizer_spec).eos_id))
            except Exception as err:  # noqa: BLE001 - the tokenizer's own check reports it
                logger.debug("no tokenizer for the split check (%s): counting every [eos]", err)
                memo.append(None)
        return memo[0]

    return lookup


def _survey(
    data_config: DataConfig, needed: frozenset[str], eos_of: Callable[[], int | None]
) -> tuple[list[str], list[SplitShortfall]]:
    """(problems: empty datasets and needed splits without a raw sample; shortfalls of splits this
    run does not need). Reads ``.idx`` files, and the last token of each document of a split only
    when the split could be too short (were every document's last token a stored ``[eos]``)."""
    if not data_config.data_path:
        return ["no --data-path given: no dataset to build samples from"], []
    n = data_config.raw_sample_length
    fractions = data_config.split_fractions
    problems: list[str] = []
    unused: list[SplitShortfall] = []
    for weight, prefix in data_config.weighted_paths:
        try:
            indexed = IndexedDataset(prefix)
        except (OSError, ValueError):
            continue  # opening it again to build it (or the caller's own check) says why
        total = indexed.num_documents
        if total == 0:
            problems.append(
                f"{prefix}: empty dataset ({index_file_path(prefix)} lists 0 documents); make it "
                "again with tools/preprocess_data.py (a --json-keys key that matched nothing?) or "
                "remove it from --data-path"
            )
            continue
        if weight is not None and weight <= 0:
            continue  # contributes no samples
        bounds = indexed.document_indices
        for name, (lo, hi) in zip(SPLIT_NAMES, split_document_ranges(total, fractions)):
            stored = int(np.sum(indexed.sizes[bounds[lo] : bounds[hi]], dtype=np.int64))
            # at least stored + documents tokens, even if every document stores its [eos]
            if hi > lo and samples_per_epoch(stored + (hi - lo), n) > 0:
                continue
            lengths = np.zeros(0, dtype=np.int64)
            if hi > lo:
                lengths, _ = _document_extents(indexed, lo, hi)
                eos_id = eos_of()
                if eos_id is not None:
                    lengths = lengths - stored_eos_flags(indexed, lo, hi, eos_id)
            shortfall = split_shortfall(
                prefix,
                name,
                hi - lo,
                packed_tokens(lengths),
                n,
                total_documents=total,
                split=data_config.split,
            )
            if shortfall is None:
                continue
            if name in needed:
                problems.append(shortfall.message())
            elif hi > lo:  # a split given no share at all is no news
                unused.append(shortfall)
    return problems, unused


def check_splits(
    data_config: DataConfig, needed: Collection[str], eos_id: int | None = None
) -> list[str]:
    """One message per problem that would stop building the ``needed`` splits ("train", "valid",
    "test"): an empty dataset (always), or a needed split of a positively weighted dataset with no
    documents or too short for one raw sample. Cheap: reads the ``.idx`` files (and one token per
    document of a nearly-too-short split); builds no sample index. Datasets that do not open are
    skipped (opening them reports why). ``eos_id`` saves building the tokenizer, which only a
    nearly-too-short split needs (to count the ``[eos]`` its documents already store)."""
    problems, _ = _survey(data_config, _split_names(needed), _eos_lookup(data_config, eos_id))
    return problems


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` to a temporary file in the same directory, then rename:
    readers never see a partial file, and concurrent writers (ranks, workers) of identical
    content are harmless."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        write(f)


def _write_cache(paths: dict[str, str], arrays: dict[str, np.ndarray], record: str) -> None:
    """Cache ``arrays[part]`` at ``paths[part]``, then their sizes and digests at ``record``."""
    for part, array in arrays.items():
        _atomic_write(paths[part], lambda f, a=array: np.save(f, a, allow_pickle=False))
    directory = os.path.dirname(record)
    files = record_files(directory, [os.path.basename(p) for p in paths.values()])
    text = json.dumps({"format": _INDEX_FORMAT, "files": files}, indent=1, sort_keys=True)
    _atomic_write(record, lambda f: f.write(text.encode()))


def _read_cache(
    paths: dict[str, str], record: str, shapes: dict[str, tuple[tuple[int, ...], Any]]
) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``paths``, memory-mapped, when ``record`` vouches for every file (size
    and SHA-256) and each has the (shape, dtype) of ``shapes``; ``None`` when nothing is cached,
    and ``None`` with a warning naming the file when something is but does not check out."""
    if not os.path.isfile(record) and not any(os.path.exists(p) for p in paths.values()):
        return None
    directory = os.path.dirname(record)
    names = {os.path.basename(p) for p in paths.values()}
    try:
        with open(record, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict) or set(files) != names:
            raise ValueError(f"it records {sorted(files)}, not {sorted(names)}")
        problems = record_problems(directory, files)
        if problems:
            raise ValueError("; ".join(problems))
        arrays = {part: np.load(p, allow_pickle=False, mmap_mode="r") for part, p in paths.items()}
        for part, (shape, dtype) in shapes.items():
            if arrays[part].shape != shape or arrays[part].dtype != dtype:
                raise ValueError(
                    f"{paths[part]} holds {arrays[part].dtype} {arrays[part].shape}, not "
                    f"{np.dtype(dtype)} {shape}"
                )
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("rebuilding the cached index %s: %s", record, err)
        return None
    return arrays


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class GLMDataset:
    """Raw packed samples of one indexed dataset restricted to a document range (one split).

    ``ds[i]`` -> ``{"text": int64 [raw_length], "index": i}``; ``len(ds)`` is the number of samples
    the caller asked for (at least one epoch); any ``i >= 0`` is valid. ``stored_eos[d]`` tells
    whether the split's document d ends with a stored ``[eos]`` (packed without a second one).
    """

    def __init__(
        self,
        prefix: str,
        document_range: tuple[int, int],
        raw_length: int,
        seed: int,
        cls_id: int,
        eos_id: int,
        num_samples: int = 0,
        name: str = "train",
        cache_dir: str | None = None,
    ) -> None:
        self.prefix, self.name = prefix, name
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.raw_length, self.seed = int(raw_length), int(seed)
        self.cls_id, self.eos_id = int(cls_id), int(eos_id)
        self.cache_dir = cache_dir or os.path.dirname(os.path.abspath(prefix))
        self.built_epochs: list[int] = []  # epochs whose index this process built (not loaded)
        self._indexed: IndexedDataset | None = IndexedDataset(prefix)
        lo, hi = self.document_range
        if not 0 <= lo < hi <= self._indexed.num_documents:
            raise ValueError(
                f"document range {document_range} of {prefix} is empty or outside "
                f"its {self._indexed.num_documents} documents"
            )
        stored, _ = _document_extents(self._indexed, lo, hi)  # [docs] in the split
        self.stored_eos = self._stored_eos(stored)  # [docs]: the document stores its [eos]
        self._doc_lengths = stored - self.stored_eos  # text only: the unit adds one [eos]
        doc_bounds = self._indexed.document_indices
        self._single_sequence = bool(np.all(np.diff(doc_bounds[lo : hi + 1]) == 1))
        n, packed = self.raw_length, packed_tokens(self._doc_lengths)
        shortfall = split_shortfall(prefix, name, hi - lo, packed, n)
        if shortfall is not None:
            raise ValueError(shortfall.message())
        self.samples_per_epoch = samples_per_epoch(packed, n)
        key = {
            "format": _INDEX_FORMAT,
            "documents": [lo, hi],
            "raw_length": n,
            "seed": self.seed,
            "doc_lengths_sha": hashlib.sha256(
                self._doc_lengths.astype(np.int64).tobytes()
            ).hexdigest(),
        }
        self.cache_key = _digest(key)
        self._salt = int(self.cache_key[:8], 16)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.num_samples = max(int(num_samples), self.samples_per_epoch)
        for epoch in range(math.ceil(self.num_samples / self.samples_per_epoch)):
            self._epoch(epoch)
        if self.built_epochs:  # one line, not one per epoch: a small split may need many
            logger.info(
                "built the sample index of %s (%s): %d epoch(s) of %d samples, cached in %s",
                self.prefix,
                self.name,
                len(self.built_epochs),
                self.samples_per_epoch,
                self.cache_dir,
            )

    def __len__(self) -> int:
        return self.num_samples

    # -- which documents store their [eos] ----------------------------------------------------

    def _stored_eos(self, stored: np.ndarray) -> np.ndarray:
        """Per document of the split: does it end with a stored ``[eos]``? Cached (reading one
        token per document touches most pages of a large ``.bin``)."""
        assert self._indexed is not None
        lo, hi = self.document_range
        key = {
            "format": _INDEX_FORMAT,
            "documents": [lo, hi],
            "eos_id": self.eos_id,
            "stored_lengths_sha": hashlib.sha256(stored.astype(np.int64).tobytes()).hexdigest(),
        }
        stem = os.path.join(
            self.cache_dir, f"{os.path.basename(self.prefix)}_glm_{_digest(key)}_eos"
        )
        paths, record = {"eos": f"{stem}.npy"}, f"{stem}_sha256.json"
        cached = _read_cache(paths, record, {"eos": (stored.shape, np.bool_)})
        if cached is not None:
            return np.asarray(cached["eos"])
        flags = stored_eos_flags(self._indexed, lo, hi, self.eos_id)
        logger.info(
            "%s (%s): %d of %d documents store a trailing [eos], packed without a second one",
            self.prefix,
            self.name,
            int(flags.sum()),
            flags.size,
        )
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            _write_cache(paths, {"eos": flags}, record)
        except OSError as err:
            logger.warning("could not cache the [eos] flags in %s (%s)", self.cache_dir, err)
        return flags

    # -- the per-epoch index ------------------------------------------------------------------

    def cache_paths(self, epoch: int) -> dict[str, str]:
        """The cached index files of ``epoch`` (``docs``, ``samples``, ``shuffle``) and their
        ``record`` of sizes and digests."""
        stem = os.path.join(
            self.cache_dir, f"{os.path.basename(self.prefix)}_glm_{self.cache_key}_e{epoch}"
        )
        paths = {part: f"{stem}_{part}.npy" for part in _INDEX_PARTS}
        return {**paths, "record": f"{stem}_sha256.json"}

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self._salt, epoch])
        num_docs = self._doc_lengths.size
        doc_order = rng.permutation(num_docs).astype(np.int64)  # positions inside the split
        unit_ends = np.cumsum(self._doc_lengths[doc_order] + 2)  # [docs]
        starts = np.arange(self.samples_per_epoch, dtype=np.int64) * (self.raw_length - 1)
        unit = np.searchsorted(unit_ends, starts, side="right")
        offset = starts - np.concatenate(([0], unit_ends))[unit]
        # a window that would open on a document's [eos] opens on the next document's [CLS]
        at_eos = offset == self._doc_lengths[doc_order[unit]] + 1
        unit, offset = unit + at_eos, np.where(at_eos, 0, offset)
        samples = np.stack((unit, offset), axis=1)  # [samples, 2]: unit position, offset in unit
        shuffle = rng.permutation(self.samples_per_epoch).astype(np.int64)
        return doc_order, samples, shuffle

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if epoch in self._epochs:
            return self._epochs[epoch]
        paths = self.cache_paths(epoch)
        record = paths.pop("record")
        spe = self.samples_per_epoch
        shapes = {
            "docs": ((self._doc_lengths.size,), np.int64),
            "samples": ((spe, 2), np.int64),
            "shuffle": ((spe,), np.int64),
        }
        cached = _read_cache(paths, record, shapes)
        if cached is not None:
            arrays = tuple(cached[part] for part in _INDEX_PARTS)
        else:
            arrays = self._build_epoch(epoch)
            self.built_epochs.append(epoch)
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                _write_cache(paths, dict(zip(_INDEX_PARTS, arrays)), record)
                logger.debug(
                    "built sample index of %s (%s, epoch %d): %d samples, cached as %s",
                    self.prefix,
                    self.name,
                    epoch,
                    spe,
                    record,
                )
            except OSError as err:
                logger.warning(
                    "could not cache the sample index in %s (%s); kept in memory",
                    self.cache_dir,
                    err,
                )
        self._epochs[epoch] = arrays
        return arrays

    # -- samples ------------------------------------------------------------------------------

    def _doc_tokens(self, position: int, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the split's document at ``position``."""
        assert self._indexed is not None
        doc = self.document_range[0] + position
        seqs = self._indexed.document_sequences(doc)
        if self._single_sequence:
            return self._indexed.get(seqs.start, start, stop - start)
        parts, base = [], 0
        for s in seqs:  # documents stored as several sequences (e.g. sentences)
            size = int(self._indexed.sizes[s])
            lo, hi = max(start - base, 0), min(stop - base, size)
            if hi > lo:
                parts.append(self._indexed.get(s, lo, hi - lo))
            base += size
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if self._indexed is None:
            self._indexed = IndexedDataset(self.prefix)
        epoch, j = divmod(index, self.samples_per_epoch)
        doc_order, samples, shuffle = self._epoch(epoch)
        unit, offset = (int(v) for v in samples[int(shuffle[j])])
        n = self.raw_length
        parts = [] if offset == 0 else [np.array([self.cls_id])]
        need = n if offset == 0 else n - 1
        while need > 0:  # a few documents per sample
            position = int(doc_order[unit])
            length = int(self._doc_lengths[position])
            take = min(need, length + 2 - offset)
            if offset == 0:
                parts.append(np.array([self.cls_id]))
            lo, hi = max(offset, 1) - 1, min(offset + take, length + 1) - 1
            if hi > lo:
                parts.append(self._doc_tokens(position, lo, hi))
            if offset + take == length + 2:
                parts.append(np.array([self.eos_id]))
            need -= take
            unit, offset = unit + 1, 0
        text = np.concatenate(parts).astype(np.int64)
        assert text.size == n, (text.size, n)
        return {"text": text, "index": index}

    def __getstate__(self) -> dict[str, Any]:
        # workers reopen the memory maps themselves and reload the index lazily
        state = dict(self.__dict__)
        state["_indexed"], state["_epochs"] = None, {}
        return state


class BlendedDataset:
    """Weighted blend: dataset d's k-th sample arrives at time (k + 0.5) / w_d; blended sample i is
    the i-th arrival (ties by dataset order). Deterministic, no randomness, and every prefix holds
    each dataset's share to within one sample. ``ds[i]`` works for any i >= 0."""

    def __init__(self, datasets: list[Any], weights: list[float], num_samples: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(weights)} for {len(datasets)}")
        total = float(sum(weights))
        self.datasets = datasets
        self.weights = np.array([w / total for w in weights], dtype=np.float64)
        self.num_samples = int(num_samples)
        self._extend(max(self.num_samples, 1))

    def _extend(self, size: int) -> None:
        """Blend index for positions [0, size): a prefix of the infinite sequence."""
        horizon = size + len(self.datasets) / 2 + 1  # enough arrivals: count(T) >= T - D/2
        times, which, ks = [], [], []
        for d, w in enumerate(self.weights):
            if w <= 0:
                continue
            k = np.arange(math.ceil(horizon * w - 0.5) + 1, dtype=np.int64)
            times.append((k + 0.5) / w)
            which.append(np.full(k.size, d, np.int16))
            ks.append(k)
        order = np.lexsort((np.concatenate(which), np.concatenate(times)))[:size]
        self.dataset_index = np.concatenate(which)[order]
        self.dataset_sample_index = np.concatenate(ks)[order]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index >= self.dataset_index.size:
            self._extend(max(2 * self.dataset_index.size, index + 1))
        d = int(self.dataset_index[index])
        sample = self.datasets[d][int(self.dataset_sample_index[index])]
        return {"text": sample["text"], "index": index}


def build_glm_datasets(
    data_config: DataConfig,
    tokenizer: Any,
    num_samples: tuple[int, int, int] = (0, 0, 0),
    splits: Collection[str] = SPLIT_NAMES,
) -> tuple[Any, Any, Any]:
    """Train / valid / test datasets of raw samples; ``None`` for a split not in ``splits``.

    Only the ``splits`` named are built, so a split a run does not use never stops it (one that
    could not give a sample is noted once in the log). A named split that has no documents or is
    shorter than one raw sample, and an empty dataset, raise ``ValueError`` with the messages of
    ``check_splits`` (one line each). ``tokenizer`` supplies ``cls_id`` and ``eos_id``; the raw
    length is ``data_config.raw_sample_length`` (``--seq-length``).
    """
    if not data_config.data_path:
        raise ValueError("data_config.data_path is empty")
    needed = _split_names(splits)
    problems, unused = _survey(data_config, needed, _eos_lookup(data_config, tokenizer.eos_id))
    if problems:
        raise ValueError("\n".join(problems))
    for shortfall in unused:
        logger.info("%s; not built: this run does not use it", shortfall.description)
    raw_length = data_config.raw_sample_length
    fractions = data_config.split_fractions
    # prefixes without weights (Megatron's "--data-path A B"): each dataset weighs its own size
    weighted = [(w, p) for w, p in data_config.weighted_paths if w is None or w > 0]
    per_split: list[list[tuple[float, GLMDataset]]] = [[], [], []]
    for weight, prefix in weighted:
        num_docs = IndexedDataset(prefix).num_documents
        for s, (lo, hi) in enumerate(split_document_ranges(num_docs, fractions)):
            if SPLIT_NAMES[s] not in needed:
                continue
            ds = GLMDataset(
                prefix,
                (lo, hi),
                raw_length,
                data_config.seed,
                tokenizer.cls_id,
                tokenizer.eos_id,
                num_samples=0 if weight is None else math.ceil(num_samples[s] * weight * 1.005) + 1,
                name=SPLIT_NAMES[s],
                cache_dir=data_config.index_cache_dir,
            )
            per_split[s].append((ds.samples_per_epoch if weight is None else weight, ds))
    result: list[Any] = []
    for s, name in enumerate(SPLIT_NAMES):
        parts = per_split[s]
        if not parts:
            result.append(None)
        elif len(parts) == 1:
            result.append(parts[0][1])
        else:
            size = max(num_samples[s], 1)
            result.append(BlendedDataset([d for _, d in parts], [w for w, _ in parts], size))
        if name in needed:
            logger.info("%s: %d samples", name, len(result[-1]))
    return result[0], result[1], result[2]
