"""Autoregressive blank infilling: raw packed samples -> fixed-shape GLM micro-batches (docs/blank-infilling.md).

Shape legend: b micro-batch size, L model input length (``DataConfig.input_length``: every batch is [b, L]),
N longest raw sample of the micro-batch, n one raw sample's length, K the span cap, s all spans of
the micro-batch (flattened, grouped by sample), t Part B tokens of the micro-batch.

A raw sample ``[CLS] doc [eos] [CLS] doc ...`` of n tokens becomes Part A (the sample with each
span replaced by one mask token, length ``sep = n - sum(len) + k``) followed by Part B (each span
as ``[sop] + span`` -> ``span + [eop]``, in shuffled order), then padding to L. The whole
micro-batch is built at once with numpy over flattened spans and tokens (no per-token Python).

Deliberate changes from the official ``blocklm_utils.py`` (docs/blank-infilling.md):
1. Every random number is a pure function of (seed, sample index, stream, counter) - a SplitMix64
   hash, no generator state - and the micro-batch's objective of (seed, index of its first sample):
   nothing depends on workers, ranks or restarts.
2. Fixed shapes: the raw length n and a cap K on the number of spans satisfy ``n + 2K <= L``
   (``megatron_glm.config.data.fixed_shape_plan``); no sample is dropped and no batch is multiplied.
3. The ablations (no span shuffle, no block positions, sentinel tokens) are kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_glm.config.data import (
    MAX_BLOCK_LENGTH,
    BlankInfillingConfig,
    fixed_shape_plan,
    span_length_probabilities,
)

logger = logging.getLogger(__name__)

OBJECTIVES = ("bert", "sentence", "gpt")
# Random streams: each use of randomness has its own, so changing one never shifts another.
_LENGTHS, _REGION, _PLACE, _ORDER, _BLOCK_MASK, _SENTENCE, _GPT, _SPLIT, _BATCH = range(1, 10)

_GOLDEN_INT, _MASK64 = 0x9E3779B97F4A7C15, (1 << 64) - 1
_GOLDEN = np.uint64(_GOLDEN_INT)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a fresh uint64 array (integer arithmetic wraps)."""
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    return z


def _stream_head(seed: int, stream: int) -> np.ndarray:
    z = (seed + stream * _GOLDEN_INT) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return np.array([z ^ (z >> 31)], dtype=np.uint64)


def _keys(seed: int, index: Any, stream: int) -> np.ndarray:
    """The per-(seed, index, stream) SplitMix64 key: compute once per sample, draw per counter."""
    return _mix64(
        _stream_head(seed % (1 << 64), stream) ^ np.array(index, ndmin=1).astype(np.uint64)
    )


def _bits53(key: np.ndarray, counter: Any) -> np.ndarray:
    """53 random bits (uint64) of draw ``counter`` under ``key``, elementwise (broadcast)."""
    z = _mix64(key + (np.array(counter, ndmin=1).astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    z >>= np.uint64(11)
    return z


def uniform(seed: int, index: Any, stream: int, counter: Any) -> np.ndarray:
    """U[0, 1) as a pure function of (seed, sample index, stream, counter), elementwise over the
    broadcast of ``index`` and ``counter`` (at least 1-d): the SplitMix64 sequence of a
    per-(seed, index, stream) key, so no generator object and no state to carry across workers or
    restarts."""
    return _unit(_bits53(_keys(seed, index, stream), counter))


def _unit(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def _sort_in_groups(groups: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``np.lexsort((bits, groups))`` for groups < 2^11 and 53-bit keys, as one stable uint64 sort
    (the same permutation: a stable sort of the concatenated key)."""
    if groups.size and int(groups.max()) >= 1 << 11:
        return np.lexsort((bits, groups))
    return np.argsort((groups.astype(np.uint64) << np.uint64(53)) | bits, kind="stable")


@dataclass(eq=False)
class SpecialTokenIds:
    """The command-token ids the construction needs, plus the sentence-end table per id."""

    pad: int
    eos: int
    cls: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    vocab_size: int
    sentence_end: np.ndarray  # [vocab] bool
    dblock: int | None = None  # official [dBLOCK] for --block-mask-prob; [MASK] when absent

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokenIds:
        return cls(
            pad=tokenizer.pad_id,
            eos=tokenizer.eos_id,
            cls=tokenizer.cls_id,
            mask=tokenizer.mask_id,
            smask=tokenizer.smask_id,
            gmask=tokenizer.gmask_id,
            sop=tokenizer.sop_id,
            eop=tokenizer.eop_id,
            vocab_size=tokenizer.vocab_size,
            sentence_end=np.asarray(tokenizer.sentence_end_mask(), dtype=bool),
            dblock=getattr(tokenizer, "dblock_id", None),
        )

    def sentinel_mask(self, idx: Any) -> Any:
        """``[MASK{idx}]``: idx 0 is ``[MASK]``; the others follow the vocabulary in pairs with
        ``[sop{idx}]`` (the official layout appends the sentinel pairs after the command tokens)."""
        return np.where(
            np.asarray(idx) == 0, self.mask, self.vocab_size + 2 * (np.asarray(idx) - 1)
        )

    def sentinel_sop(self, idx: Any) -> Any:
        return np.where(
            np.asarray(idx) == 0, self.sop, self.vocab_size + 2 * (np.asarray(idx) - 1) + 1
        )


def span_length_distribution(avg_block_length: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson(avg) restricted to 1..MAX_BLOCK_LENGTH-1 and renormalised: (lengths, probabilities)."""
    return np.arange(1, MAX_BLOCK_LENGTH), np.array(span_length_probabilities(avg_block_length))


@dataclass
class InfilledSample:
    """One constructed sample (numpy, unpadded) with the spans it was built from."""

    tokens: np.ndarray  # [sep + t_i] int64: Part A, then Part B inputs
    labels: np.ndarray  # [sep + t_i] int64: Part A, then Part B targets (aligned, no shift)
    loss_mask: np.ndarray  # [sep + t_i] float32
    position_ids: np.ndarray  # [2, sep + t_i] int64: absolute, block
    sep: int  # Part A length
    raw: np.ndarray  # [n] the raw sample the spans refer to (after a short-sequence split)
    span_starts: np.ndarray  # [k] raw positions, ascending
    span_lengths: np.ndarray  # [k]
    order: np.ndarray  # [k] Part B order: order[j] is the ascending index of Part B's j-th span
    suffix: bool = False  # gpt suffix form: Part B is [sop] + span[:-1] -> span (no [eop])


def _group_starts(groups: np.ndarray) -> np.ndarray:
    """For sorted group labels, the index of each element's group's first element."""
    return np.searchsorted(groups, groups, side="left")


def _group_exclusive_cumsum(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    excl = np.cumsum(values) - values
    return excl - excl[_group_starts(groups)] if values.size else excl


def _runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True in each row of a [b, N] bool array: (row, start column, length), row-major."""
    b, width = flags.shape
    # rows laid out with one False column in front (and one False at the very end), so every run
    # starts and ends at a change of value: the changes alternate start, end
    buf = np.zeros(b * (width + 1) + 1, dtype=bool)
    buf[: b * (width + 1)].reshape(b, width + 1)[:, 1:] = flags
    edges = np.flatnonzero(buf[1:] != buf[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    return starts // (width + 1), starts % (width + 1) - 1, ends - starts


@dataclass
class _Spans:
    """Spans of a micro-batch, sorted by (sample, start)."""

    sample: np.ndarray  # [s]
    start: np.ndarray  # [s]
    length: np.ndarray  # [s]


class BlankInfillingCollator:
    """Collate raw samples ``{"text": int array [n], "index": int}`` into one fixed-shape micro-batch.

    Output: ``tokens [b,L] int64``, ``labels [b,L] int64``, ``loss_mask [b,L] float32``,
    ``position_ids [b,2,L] int64``, ``sep [b] int64``, ``objective`` (str), ``num_loss_tokens`` (int).
    The objective is drawn from (seed, index of the first sample), each sample's spans from
    (seed, its index): no dependence on workers, ranks or restarts.
    """

    def __init__(
        self, config: BlankInfillingConfig, ids: SpecialTokenIds | Any, input_length: int, seed: int
    ) -> None:
        self.config = config
        self.ids = ids if isinstance(ids, SpecialTokenIds) else SpecialTokenIds.from_tokenizer(ids)
        self.plan = fixed_shape_plan(input_length, config)
        self.seed = int(seed)
        _, probs = span_length_distribution(config.avg_block_length)
        self._span_cdf = np.cumsum(probs)
        self._span_cdf[-1] = 1.0
        if config.block_mask_prob > 0 and self.ids.dblock is None:
            logger.warning(
                "block_mask_prob=%s: the tokenizer has no [dBLOCK]; using [MASK] instead",
                config.block_mask_prob,
            )
        masks = (
            (self.ids.mask, self.ids.smask, self.ids.gmask)
            if config.task_mask
            else (self.ids.mask,) * 3
        )
        self._mask_of = dict(zip(OBJECTIVES, masks))
        self._columns = np.arange(input_length)  # [L]
        # u < p  <=>  53-bit draw < ceil(p 2^53): u is the draw times 2^-53, exactly
        self._block_mask_bits = np.uint64(math.ceil(config.block_mask_prob * (1 << 53)))

    @property
    def sentinel_vocab_size(self) -> int:
        """Vocabulary the model needs with ``sentinel_token`` (K-1 extra [MASKi]/[sopi] pairs)."""
        extra = 2 * (self.plan.max_spans - 1) if self.config.sentinel_token else 0
        return self.ids.vocab_size + extra

    # -- the micro-batch's draws ---------------------------------------------------------------

    def micro_batch_plan(self, first_index: int) -> dict[str, Any]:
        """Objective, short-sequence split and gpt length fraction of the micro-batch whose first
        sample is ``first_index`` (official ``construct_blocks`` order of decisions)."""
        cfg, n = self.config, self.plan.raw_length
        u = uniform(self.seed, first_index, _BATCH, np.arange(5))
        short = bool(u[0] < cfg.short_seq_prob) and n - 1 > 32
        single = bool(u[2] < cfg.single_span_prob)
        if single or u[3] < cfg.bert_prob:  # a single-span micro-batch is a token-span one
            objective = "bert"
        elif u[3] < cfg.bert_prob + cfg.gap_sentence_prob:
            objective = "sentence"
        else:
            objective = "gpt"
        # official split_samples: target length uniform in [32, n - 2]
        target = 32 + int(u[1] * (n - 1 - 32)) if short else n
        return {
            "objective": objective,
            "short": short,
            "target": target,
            "single": single,
            "gpt_fraction": float(u[4]),
        }

    def _split_short(self, raw: np.ndarray, index: int, target: int) -> np.ndarray:
        """Official ``split_samples`` with one window per sample (not several): ``[CLS]`` + about
        ``target`` tokens starting after and ending at a sentence boundary when possible."""
        ids, body = self.ids, raw[1:]
        if target >= body.size:
            return raw
        special = (body == ids.eos) | (body == ids.cls)
        boundary = ids.sentence_end[body] | (body == ids.eos)
        start = int(uniform(self.seed, index, _SPLIT, 0)[0] * (body.size - target))
        ok_start = ~special & np.concatenate(([True], boundary[:-1] | special[:-1]))
        candidates = np.flatnonzero(ok_start[: start + 1])
        start = int(candidates[-1]) if candidates.size else 0
        ends = np.flatnonzero(boundary[start : start + target]) + start + 1
        end = int(ends[-1]) if ends.size else start
        if end - start < target // 2:
            end = start + target
        return np.concatenate(([ids.cls], body[start:end])).astype(np.int64)

    # -- spans ---------------------------------------------------------------------------------

    def _span_lengths(
        self, idx: np.ndarray, n: np.ndarray, single: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Poisson span lengths per sample until they cover floor(bert_ratio * n): [b, K] + counts."""
        big_k = self.plan.max_spans
        lengths = (
            np.searchsorted(
                self._span_cdf,
                uniform(self.seed, idx[:, None], _LENGTHS, np.arange(big_k)),
                side="right",
            )
            + 1
        )
        m = (self.config.bert_ratio * n).astype(np.int64)
        reached = np.cumsum(lengths, axis=1) >= m[:, None]
        count = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, big_k)
        count = np.where(m > 0, count, 0)
        if single:
            return lengths, np.ones_like(count)
        for row in np.flatnonzero(~reached.any(axis=1) & (m > 0)):  # cap reached: rare
            deficit = int(m[row] - lengths[row].sum())
            for j in range(big_k):  # lengthen spans up to the maximum length until they cover m
                grow = min(MAX_BLOCK_LENGTH - 1 - int(lengths[row, j]), deficit)
                lengths[row, j] += grow
                deficit -= grow
        return lengths, count

    def _token_spans(
        self, raws: np.ndarray, n: np.ndarray, idx: np.ndarray, single: bool
    ) -> _Spans:
        """Token spans placed inside documents: each span picks one of its sample's documents
        (maskable runs: no [CLS], no [eos], not the last token) with probability proportional to
        the run's length; inside a run, spans take uniform places with >= 1 token between them
        (official ``sample_spans``). A sample whose runs cannot hold what they drew re-assigns its
        spans one by one, shortening (or dropping) a span only when no run has room."""
        ids, (b, width) = self.ids, raws.shape
        lengths, count = self._span_lengths(idx, n, single)
        ok = (raws != ids.cls) & (raws != ids.eos) & (np.arange(width) < (n - 1)[:, None])
        run_sample, run_start, run_len = _runs(ok)  # [r] maskable runs, grouped by sample
        room = np.bincount(run_sample, weights=run_len, minlength=b).astype(np.int64)
        active = (np.arange(lengths.shape[1]) < count[:, None]) & (room > 0)[:, None]
        sample, slot = np.nonzero(active)  # [s], grouped by sample, drawn order inside
        length = lengths[sample, slot]
        u_region = _unit(_bits53(_keys(self.seed, idx, _REGION)[sample], slot))
        room_end = np.cumsum(run_len)
        room_begin = room_end - run_len
        first_run = np.searchsorted(run_sample, np.arange(b))
        target = room_begin[first_run[sample]] + (u_region * room[sample]).astype(np.int64)
        run = np.searchsorted(room_end, target, side="right")  # [s] global run id
        used = np.bincount(run, weights=length + 1, minlength=run_len.size) - 1
        full = np.flatnonzero(used > run_len)
        if full.size:  # re-assign the spans of the samples with an over-full run
            crowded = np.zeros(b, dtype=bool)
            crowded[run_sample[full]] = True
            redo = crowded[sample]
            run, length = run.copy(), length.copy()
            for s in np.unique(sample[redo]).tolist():
                rows = np.flatnonzero(sample == s)
                runs = np.flatnonzero(run_sample == s)
                run[rows], length[rows] = self._assign_sequential(
                    length[rows].tolist(), u_region[rows].tolist(), runs, run_len[runs].tolist()
                )
            keep = length > 0
            sample, slot, length, run = sample[keep], slot[keep], length[keep], run[keep]
        # uniform places inside each run (spans grouped by run, drawn order kept inside)
        by_run = np.argsort(run, kind="stable")
        sample, slot, length, run = sample[by_run], slot[by_run], length[by_run], run[by_run]
        span_sum = np.bincount(run, weights=length, minlength=run_len.size).astype(np.int64)
        span_count = np.bincount(run, minlength=run_len.size)
        free = run_len - span_sum - span_count + 1
        place = (
            _unit(_bits53(_keys(self.seed, idx, _PLACE)[sample], slot)) * (free[run] + 1)
        ).astype(np.int64)
        place = np.sort(run * (width + 1) + place) - run * (width + 1)  # sorted inside each run
        start = run_start[run] + place + _group_exclusive_cumsum(length + 1, run)
        return _Spans(sample=sample, start=start, length=length)

    @staticmethod
    def _assign_sequential(
        lengths: list[int], draws: list[float], runs: np.ndarray, run_len: list[int]
    ) -> tuple[list[int], list[int]]:
        """Per span (a few dozen): a run with room, chosen proportionally to its free room."""
        free, used = list(run_len), [0] * len(run_len)
        out_run, out_len = [], []
        for span, u in zip(lengths, draws):
            fits = [r for r in range(len(free)) if free[r] >= span + used[r]]
            if not fits:  # shorten to the largest room left (a gap token counts when non-empty)
                best = max(range(len(free)), key=lambda r: free[r] - used[r])
                span = free[best] - used[best]
                if span <= 0:
                    out_run.append(int(runs[0]))
                    out_len.append(0)
                    continue
                fits = [best]
            total = sum(free[r] for r in fits)
            x, acc, pick = u * total, 0, fits[-1]
            for r in fits:
                acc += free[r]
                if x < acc:
                    pick = r
                    break
            free[pick] -= span + used[pick]
            used[pick] = 1
            out_run.append(int(runs[pick]))
            out_len.append(span)
        return out_run, out_len

    def _sentence_spans(self, raws: np.ndarray, n: np.ndarray, idx: np.ndarray) -> _Spans:
        """Whole sentences (runs of non-[CLS]/[eos] tokens ending after a sentence-end token or at
        a document end), shuffled, taken until >= gap_sentence_ratio of the tokens, at most K."""
        ids, (b, width) = self.ids, raws.shape
        special = (raws == ids.cls) | (raws == ids.eos) | (np.arange(width) >= n[:, None])
        special = np.concatenate((special, np.ones((b, 1), bool)), axis=1).ravel()
        breaks = special | (ids.sentence_end[np.concatenate((raws, raws[:, :1]), axis=1).ravel()])
        first = ~special & np.concatenate(([True], breaks[:-1]))
        flat_start = np.flatnonzero(first)
        length = np.bincount((np.cumsum(first) - 1)[~special], minlength=flat_start.size)
        sample = flat_start // (width + 1)
        ordinal = np.arange(sample.size) - _group_starts(sample)
        shuffled = _sort_in_groups(
            sample, _bits53(_keys(self.seed, idx, _SENTENCE)[sample], ordinal)
        )
        taken = _group_exclusive_cumsum(length[shuffled], sample[shuffled])
        rank = np.arange(sample.size) - _group_starts(sample[shuffled])
        target = (self.config.gap_sentence_ratio * n).astype(np.int64)[sample[shuffled]]
        pick = shuffled[((taken < target) | (rank == 0)) & (rank < self.plan.max_spans)]
        pick = np.sort(pick)  # back to (sample, start) order
        return _Spans(
            sample=sample[pick], start=flat_start[pick] % (width + 1), length=length[pick]
        )

    # -- assembly ------------------------------------------------------------------------------

    def _assemble_blocks(
        self,
        raws: np.ndarray,
        n: np.ndarray,
        idx: np.ndarray,
        spans: _Spans,
        tail: np.ndarray,
        objective: str,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Part A / Part B of official ``make_block_data`` for every row: the padded [b, L] arrays
        and each span's rank in Part B. ``tail`` [s] marks gpt suffix-form spans (official gpt
        suffix: Part B is ``[sop] + span[:-1] -> span``, no [eop], loss 0 on [CLS] targets).
        Every row is a prefix Part A (``sep``) + Part B (``used - sep``), so each output is written
        with two boolean masks over [b, L] whose True cells are in the flat token order."""
        cfg, ids, (b, width), L = self.config, self.ids, raws.shape, self.plan.input_length
        s, start, length = spans.sample, spans.start, spans.length
        # Part A: drop span interiors (spans are disjoint and sorted by (sample, start)), keep each
        # span's first position for its mask token
        flat_start = s * width + start
        edge = np.zeros(b * width + 1, np.int8)
        edge[flat_start + 1] = 1
        edge[flat_start + length] -= 1  # a length-1 span cancels its own +1
        interior = np.cumsum(edge[:-1], dtype=np.int8).reshape(b, width)
        keep = (interior == 0) & (np.arange(width) < n[:, None])
        sep = n - np.bincount(s, weights=length - 1, minlength=b).astype(np.int64)  # [b]
        mask_pos = start - _group_exclusive_cumsum(length - 1, s)  # [s] Part A index of the span
        part_a = raws[keep]  # [sum(sep)] flat, row after row
        # Part B order: random keys per span (its ascending rank in the sample as counter)
        ordinal = np.arange(s.size) - _group_starts(s)
        if cfg.shuffle_blocks:
            key = _keys(self.seed, idx, _ORDER)[s]
            order = _sort_in_groups(s, _bits53(key, ordinal))
        else:
            order = np.arange(s.size)
        rank = np.empty(s.size, np.int64)
        rank[order] = ordinal  # ordinal of the sorted position == rank inside the sample
        mask_at = (np.cumsum(sep) - sep)[s] + mask_pos
        if cfg.sentinel_token and objective == "bert":
            part_a[mask_at] = ids.sentinel_mask(rank)
        else:
            part_a[mask_at] = self._mask_of[objective]
        # Part B: segment j (Part B order) is [sop] + span -> span + [eop] (tail: one shorter)
        seg_sample, seg_tail = s[order], tail[order]
        seg_len = length[order] + 1 - seg_tail
        seg_begin = np.cumsum(seg_len) - seg_len  # [S] flat Part B offset
        seg = np.repeat(np.arange(order.size), seg_len)  # [t] segment of each Part B token
        flat = np.arange(seg.size)
        w = flat - seg_begin[seg]  # [t] offset inside its segment
        src = (seg_sample * width + start[order] - seg_begin)[seg] + flat  # flat raw index at w
        flat_raws = raws.ravel()
        inputs = flat_raws[src - 1]
        inputs[seg_begin] = ids.sentinel_sop(ordinal) if cfg.sentinel_token else ids.sop
        targets = flat_raws.take(src, mode="clip")
        targets[(seg_begin + seg_len - 1)[~seg_tail]] = ids.eop
        used = sep + np.bincount(seg_sample, weights=seg_len, minlength=b).astype(np.int64)
        if cfg.block_mask_prob > 0 and objective == "bert":
            col = (sep[seg_sample] + _group_exclusive_cumsum(seg_len, seg_sample))[seg] + w
            key = _keys(self.seed, idx, _BLOCK_MASK)[seg_sample][seg]
            hide = w > 0
            hide &= _bits53(key, col) < self._block_mask_bits
            inputs[hide] = ids.dblock if ids.dblock is not None else ids.mask
        columns = self._columns
        in_a = columns < sep[:, None]  # [b, L]
        in_b = (columns < used[:, None]) ^ in_a
        tokens = np.full((b, L), ids.pad, np.int64)
        tokens[in_a] = part_a
        labels = tokens.copy()  # Part A labels are Part A
        tokens[in_b] = inputs
        labels[in_b] = targets
        loss = np.zeros((b, L), np.float32)
        loss[in_b] = ~(seg_tail[seg] & (targets == ids.cls))
        pos = np.zeros((b, 2, L), np.int64)
        pos[:, 0] = np.where(in_a, columns, 0)
        seg_pos = mask_pos[order]
        if cfg.sentinel_token:  # the official code: every Part B token at position n
            seg_pos = np.where(seg_tail, seg_pos, self.plan.raw_length)
        pos[:, 0][in_b] = seg_pos[seg]
        pos[:, 1][in_b] = w + 1 if cfg.block_position_encoding else 1
        out = {"tokens": tokens, "labels": labels, "loss": loss, "pos": pos}
        return {**out, "sep": sep, "used": used}, rank

    # -- a micro-batch -------------------------------------------------------------------------

    def collate_arrays(
        self, raws: list[np.ndarray], indices: list[int], plan: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The micro-batch as numpy arrays plus what it was built from (``raws`` after a
        short-sequence split, ``spans``, span ``rank`` in Part B, ``suffix`` rows)."""
        if len(raws) != len(indices) or not raws:
            raise ValueError(f"need one index per raw sample, got {len(raws)} and {len(indices)}")
        plan = plan or self.micro_batch_plan(int(indices[0]))
        objective, b, L = plan["objective"], len(raws), self.plan.input_length
        idx = np.asarray(indices, dtype=np.int64)
        raws = [np.asarray(r, dtype=np.int64) for r in raws]
        if plan["short"]:
            raws = [self._split_short(r, int(i), plan["target"]) for r, i in zip(raws, indices)]
        n = np.array([r.size for r in raws], dtype=np.int64)
        width = int(n.max())
        if width + 2 * self.plan.max_spans > L:
            raise ValueError(
                f"raw samples of {width} tokens do not fit the input length {L} with "
                f"{self.plan.max_spans} spans; use raw_length {self.plan.raw_length}"
            )
        if int(n.min()) == width:
            packed = np.stack(raws)  # [b, N]
        else:
            packed = np.full((b, width), self.ids.pad, dtype=np.int64)
            for row, r in enumerate(raws):
                packed[row, : r.size] = r
        suffix, g = np.zeros(b, dtype=bool), None
        if objective == "bert":
            spans = self._token_spans(packed, n, idx, plan["single"])
        elif objective == "sentence":
            spans = self._sentence_spans(packed, n, idx)
        else:
            hi = n - 2
            lo = np.minimum((self.config.gpt_min_ratio * n).astype(np.int64), hi)
            g = np.maximum(
                1, lo + np.minimum((plan["gpt_fraction"] * (hi - lo + 1)).astype(np.int64), hi - lo)
            )
            u = uniform(self.seed, idx[:, None], _GPT, np.arange(2))
            first_eos = np.where(packed == self.ids.eos, np.arange(width), width).min(axis=1)
            multi_doc = first_eos < n - 1
            suffix = (u[:, 0] < self.config.gpt_infill_prob) | multi_doc
            # suffix rows: the last g tokens; the others one span inside the single document,
            # never [CLS] (first) nor the last token
            start = np.where(suffix, n - g, 1 + (u[:, 1] * (n - 2 - g + 1)).astype(np.int64))
            spans = _Spans(sample=np.arange(b), start=start, length=g)
        out, rank = self._assemble_blocks(packed, n, idx, spans, suffix[spans.sample], objective)
        if suffix.any():  # report the block spans only (suffix rows are described by g)
            spans = _Spans(sample=np.flatnonzero(~suffix), start=start[~suffix], length=g[~suffix])
            rank = rank[~suffix]
        return {
            "objective": objective,
            "tokens": out["tokens"],
            "labels": out["labels"],
            "loss_mask": out["loss"],
            "position_ids": out["pos"],
            "sep": out["sep"],
            "used": out["used"],
            "raws": raws,
            "spans": spans,
            "rank": rank,
            "suffix": suffix,
            "gpt_length": g,
        }

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        a = self.collate_arrays(
            [item["text"] for item in batch], [int(item["index"]) for item in batch]
        )
        return {
            "tokens": torch.from_numpy(a["tokens"]),
            "labels": torch.from_numpy(a["labels"]),
            "loss_mask": torch.from_numpy(a["loss_mask"]),
            "position_ids": torch.from_numpy(a["position_ids"]),
            "sep": torch.from_numpy(a["sep"]),
            "objective": a["objective"],
            "num_loss_tokens": int(a["loss_mask"].sum()),
        }

    def make_samples(
        self, raws: list[np.ndarray], indices: list[int], plan: dict[str, Any] | None = None
    ) -> tuple[str, list[InfilledSample]]:
        """The objective of this micro-batch and its unpadded samples (for checks and display)."""
        a = self.collate_arrays(raws, indices, plan)
        spans, samples = a["spans"], []
        for row in range(len(raws)):
            t = int(a["used"][row])
            mine = spans.sample == row
            if a["suffix"][row]:
                g = int(a["gpt_length"][row])
                starts, lengths = np.array([a["raws"][row].size - g]), np.array([g])
                order = np.array([0])
            else:
                starts, lengths = spans.start[mine], spans.length[mine]
                order = np.argsort(a["rank"][mine], kind="stable")
            samples.append(
                InfilledSample(
                    tokens=a["tokens"][row, :t],
                    labels=a["labels"][row, :t],
                    loss_mask=a["loss_mask"][row, :t],
                    position_ids=a["position_ids"][row, :, :t],
                    sep=int(a["sep"][row]),
                    raw=a["raws"][row],
                    span_starts=starts,
                    span_lengths=lengths,
                    order=order,
                    suffix=bool(a["suffix"][row]),
                )
            )
        return a["objective"], samples

    def build_sample(
        self,
        raw: np.ndarray,
        index: int,
        objective: str,
        single: bool = False,
        gpt_fraction: float = 0.0,
    ) -> InfilledSample:
        """One sample with a given objective; identical to that sample inside any micro-batch
        with the same objective (``gpt_fraction`` places g in [int(gpt_min_ratio n), n - 2])."""
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        plan = {
            "objective": objective,
            "short": False,
            "target": 0,
            "single": single,
            "gpt_fraction": gpt_fraction,
        }
        return self.make_samples([raw], [index], plan)[1][0]

    def pad(self, objective: str, samples: list[InfilledSample]) -> dict[str, Any]:
        """Pad constructed samples to [b, L] (pad id for tokens and labels, loss 0, positions 0)."""
        b, length = len(samples), self.plan.input_length
        tokens = np.full((b, length), self.ids.pad, np.int64)
        labels = np.full((b, length), self.ids.pad, np.int64)
        loss_mask = np.zeros((b, length), np.float32)
        position_ids = np.zeros((b, 2, length), np.int64)
        for row, s in enumerate(samples):
            t = s.tokens.size
            tokens[row, :t], labels[row, :t], loss_mask[row, :t] = s.tokens, s.labels, s.loss_mask
            position_ids[row, :, :t] = s.position_ids
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "sep": torch.tensor([s.sep for s in samples], dtype=torch.int64),
            "objective": objective,
            "num_loss_tokens": int(loss_mask.sum()),
        }
