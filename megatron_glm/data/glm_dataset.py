"""Packed raw GLM samples from indexed datasets: split by documents, epochs, blending, cached index.

A dataset's documents, each as the unit ``[CLS] doc [eos]``, are laid end to end in an
epoch-specific random order; sample j of the epoch is the window of the raw length n that starts
at unit position ``j * (n - 1)``: ``[CLS]`` + the next n - 1 tokens, or, when the window starts
exactly at a document's ``[CLS]`` (or at the ``[eos]`` just before it), the n tokens from that
``[CLS]`` on (then the sample's last token or two are also the next sample's first ones). Samples are shuffled within their epoch. Everything is a pure
function of (seed, sample index): ``ds[i]`` works for any i, epoch ``i // samples_per_epoch``.

The per-epoch index (document order, sample starts as (unit, offset), sample shuffle) is built once
with numpy and cached as ``.npy`` files next to the data, named by a hash of what determines it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from typing import Any

import numpy as np

from megatron_glm.config.data import DataConfig
from megatron_glm.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

_INDEX_FORMAT = 1  # bump when the index layout or its construction changes
SPLIT_NAMES = ("train", "valid", "test")


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


def _save_atomic(path: str, array: np.ndarray) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see a partial
    file, and concurrent writers (ranks, workers) of identical content are harmless."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class GLMDataset:
    """Raw packed samples of one indexed dataset restricted to a document range (one split).

    ``ds[i]`` -> ``{"text": int64 [raw_length], "index": i}``; ``len(ds)`` is the number of samples
    the caller asked for (at least one epoch); any ``i >= 0`` is valid.
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
        token_starts = np.concatenate(([0], np.cumsum(self._indexed.sizes, dtype=np.int64)))
        doc_bounds = np.asarray(self._indexed.document_indices, dtype=np.int64)
        self._doc_lengths = (
            token_starts[doc_bounds[lo + 1 : hi + 1]] - token_starts[doc_bounds[lo:hi]]
        )  # [docs] in the split
        self._single_sequence = bool(np.all(np.diff(doc_bounds[lo : hi + 1]) == 1))
        units = int(self._doc_lengths.sum()) + 2 * (hi - lo)  # each doc + [CLS] + [eos]
        n = self.raw_length
        # window j starts at j * (n - 1), one later when it hits an [eos]; it must end in the epoch
        self.samples_per_epoch = (units - n - 1) // (n - 1) + 1 if units >= n + 1 else 0
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"{prefix} split {name} ({hi - lo} documents, {units} tokens with "
                f"[CLS]/[eos]) is shorter than one raw sample of {n} tokens"
            )
        key = {
            "format": _INDEX_FORMAT,
            "documents": [lo, hi],
            "raw_length": n,
            "seed": self.seed,
            "doc_lengths_sha": hashlib.sha256(self._doc_lengths.tobytes()).hexdigest(),
        }
        self.cache_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self._salt = int(self.cache_key[:8], 16)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.num_samples = max(int(num_samples), self.samples_per_epoch)
        for epoch in range(math.ceil(self.num_samples / self.samples_per_epoch)):
            self._epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    # -- the per-epoch index ------------------------------------------------------------------

    def cache_paths(self, epoch: int) -> dict[str, str]:
        stem = os.path.join(
            self.cache_dir, f"{os.path.basename(self.prefix)}_glm_{self.cache_key}_e{epoch}"
        )
        return {part: f"{stem}_{part}.npy" for part in ("docs", "samples", "shuffle")}

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
        arrays = None
        if all(os.path.isfile(p) for p in paths.values()):
            try:
                arrays = tuple(
                    np.load(paths[p], allow_pickle=False, mmap_mode="r")
                    for p in ("docs", "samples", "shuffle")
                )
            except (OSError, ValueError) as err:
                logger.warning("ignoring unreadable sample index %s: %s", paths["docs"], err)
        if arrays is None:
            arrays = self._build_epoch(epoch)
            self.built_epochs.append(epoch)
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                for part, array in zip(("docs", "samples", "shuffle"), arrays):
                    _save_atomic(paths[part], array)
                logger.info(
                    "built sample index of %s (%s, epoch %d): %d samples, cached as %s",
                    self.prefix,
                    self.name,
                    epoch,
                    self.samples_per_epoch,
                    paths["docs"],
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
    data_config: DataConfig, tokenizer: Any, num_samples: tuple[int, int, int] = (0, 0, 0)
) -> tuple[Any, Any, Any]:
    """Train / valid / test datasets of raw samples (``None`` for a split without documents).

    ``tokenizer`` supplies ``cls_id`` and ``eos_id``; the raw length is
    ``data_config.raw_sample_length`` so that blank infilling fits ``seq_length``.
    """
    if not data_config.data_path:
        raise ValueError("data_config.data_path is empty")
    raw_length = data_config.raw_sample_length
    fractions = data_config.split_fractions
    per_split: list[list[tuple[float, GLMDataset]]] = [[], [], []]
    for weight, prefix in data_config.weighted_paths:
        num_docs = IndexedDataset(prefix).num_documents
        for s, (lo, hi) in enumerate(split_document_ranges(num_docs, fractions)):
            if hi > lo:
                want = math.ceil(num_samples[s] * weight * 1.005) + 1 if weight > 0 else 0
                ds = GLMDataset(
                    prefix,
                    (lo, hi),
                    raw_length,
                    data_config.seed,
                    tokenizer.cls_id,
                    tokenizer.eos_id,
                    num_samples=want,
                    name=SPLIT_NAMES[s],
                    cache_dir=data_config.index_cache_dir,
                )
                per_split[s].append((weight, ds))
    result: list[Any] = []
    for s in range(3):
        parts = per_split[s]
        if not parts:
            result.append(None)
        elif len(data_config.weighted_paths) == 1:
            result.append(parts[0][1])
        else:
            size = max(num_samples[s], 1)
            result.append(BlendedDataset([d for _, d in parts], [w for w, _ in parts], size))
        logger.info(
            "%s: %s", SPLIT_NAMES[s], "none" if result[-1] is None else f"{len(result[-1])} samples"
        )
    return result[0], result[1], result[2]
