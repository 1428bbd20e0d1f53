"""Blank-infilling sample construction: megatron_glm's vectorised collator vs a per-token baseline.

Baseline (written here): a straightforward Python implementation of the same construction
(docs/blank-infilling.md#part-a--part-b-layout) in the style of the official ``blocklm_utils.py``:
``random.Random`` per micro-batch and per sample, span lengths with ``random.choices``, documents /
sentences / Part A / Part B / positions / padding built token by token in Python lists, then
``torch.tensor``.

Ours: ``BlankInfillingCollator`` (counter-based SplitMix64 draws, numpy over tokens, loops only over spans).

Same raw samples (synthetic documents of 30..1500 tokens packed as ``[CLS] doc [eos] ...``, a
sentence end every ~12 tokens), same 10B mixture (bert 0.5 / sentence 0.3 / gpt 0.2, task masks,
gpt_min_ratio 0.25, block_mask_prob 0.1, short_seq_prob 0.02), micro-batch 21, same run. This
script's ``--input-length`` (default 512) is the collator's input length L; the trainer's
``--seq-length`` is the raw length: L = 512 means raw samples of 446 tokens (docs/blank-infilling.md#fixed-shapes-deliberate-change-2).
Both outputs are checked for fixed shapes and ``sep = n - sum(len) + k``. Usage::

    python benchmarks/bench_blank_infilling.py [--batches 40] [--repeats 3] [--interleaved]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_glm.config.data import MAX_BLOCK_LENGTH, BlankInfillingConfig  # noqa: E402
from megatron_glm.data.blank_infilling import (  # noqa: E402
    BlankInfillingCollator,
    SpecialTokenIds,
    span_length_distribution,
)

VOCAB, PERIOD = 50304, 13


def synthetic_ids() -> SpecialTokenIds:
    end = np.zeros(VOCAB, dtype=bool)
    end[[PERIOD, 198]] = True
    return SpecialTokenIds(
        pad=50256,
        eos=50256,
        cls=50259,
        mask=50260,
        smask=50264,
        gmask=50263,
        sop=50257,
        eop=50258,
        vocab_size=VOCAB,
        sentence_end=end,
    )


def synthetic_raw_samples(n: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    stream_parts, size = [], 0
    while size < count * (n - 1) + n:
        length = int(rng.integers(30, 1500))
        doc = rng.integers(300, 50000, size=length)
        doc[rng.random(length) < 1 / 12] = PERIOD
        stream_parts += [[50259], doc, [50256]]
        size += length + 2
    stream = np.concatenate(stream_parts).astype(np.int64)
    return [
        np.concatenate(([50259], stream[j * (n - 1) : (j + 1) * (n - 1)])) for j in range(count)
    ]


class PerTokenBaseline:
    """The same construction, token by token in Python."""

    def __init__(self, cfg: BlankInfillingConfig, ids: SpecialTokenIds, plan, seed: int) -> None:
        self.cfg, self.ids, self.plan, self.seed = cfg, ids, plan, seed
        lengths, probs = span_length_distribution(cfg.avg_block_length)
        self.lengths, self.weights = lengths.tolist(), probs.tolist()
        self.end = ids.sentence_end.tolist()

    def collate(self, raws: list[np.ndarray], indices: list[int]) -> dict:
        cfg, n = self.cfg, self.plan.raw_length
        rng = random.Random(self.seed * 1_000_003 + indices[0])
        short = rng.random() < cfg.short_seq_prob
        target = rng.randrange(32, n - 1)
        u = rng.random()
        objective = (
            "bert"
            if u < cfg.bert_prob
            else ("sentence" if u < cfg.bert_prob + cfg.gap_sentence_prob else "gpt")
        )
        frac = rng.random()
        rows = []
        for raw, index in zip(raws, indices):
            srng = random.Random(self.seed * 1_000_003 + index + 7919)
            tokens = raw.tolist()
            if short:
                tokens = self.split(tokens, target, srng)
            rows.append(getattr(self, objective)(tokens, srng, frac))
        return self.pad(rows, objective)

    def split(self, tokens: list[int], target: int, rng: random.Random) -> list[int]:
        ids, body = self.ids, tokens[1:]
        if target >= len(body):
            return tokens
        start = rng.randrange(0, len(body) - target)
        while start > 0 and (
            body[start] in (ids.eos, ids.cls)
            or not (self.end[body[start - 1]] or body[start - 1] in (ids.eos, ids.cls))
        ):
            start -= 1
        end = start + target
        while end > start and not (self.end[body[end - 1]] or body[end - 1] == ids.eos):
            end -= 1
        if end - start < target // 2:
            end = start + target
        return [ids.cls] + body[start:end]

    def regions(self, tokens: list[int]) -> list[tuple[int, int]]:
        out, start = [], None
        for i, t in enumerate(tokens):
            ok = t != self.ids.cls and t != self.ids.eos and i != len(tokens) - 1
            if ok and start is None:
                start = i
            if not ok and start is not None:
                out.append((start, i - start))
                start = None
        return out

    def bert(self, tokens: list[int], rng: random.Random, _frac: float) -> tuple:
        m = int(self.cfg.bert_ratio * len(tokens))
        lengths, covered = [], 0
        while covered < m and len(lengths) < self.plan.max_spans:
            x = rng.choices(self.lengths, weights=self.weights)[0]
            lengths.append(x)
            covered += x
        while covered < m:  # cap reached: lengthen spans
            for j in range(len(lengths)):
                if covered < m and lengths[j] < MAX_BLOCK_LENGTH - 1:
                    lengths[j] += 1
                    covered += 1
        regions = self.regions(tokens)
        free = [r[1] for r in regions]
        assigned = [[] for _ in regions]
        for span in lengths:
            need = [span + (1 if assigned[r] else 0) for r in range(len(free))]
            cands = [r for r in range(len(free)) if free[r] >= need[r]]
            if not cands:
                continue
            r = rng.choices(cands, weights=[free[c] for c in cands])[0]
            free[r] -= need[r]
            assigned[r].append(span)
        spans = []
        for (offset, room), group in zip(regions, assigned):
            if group:
                m_places = room - sum(group) - len(group) + 1
                places = sorted(rng.randrange(m_places + 1) for _ in group)
                for place, length in zip(places, group):
                    spans.append((offset + place, offset + place + length))
                    offset += length + 1
        return self.blocks(tokens, sorted(spans), rng, "bert")

    def sentence(self, tokens: list[int], rng: random.Random, _frac: float) -> tuple:
        ids, spans, last = self.ids, [], None
        for i, t in enumerate(tokens):
            if t in (ids.cls, ids.eos):
                if last is not None:
                    spans.append((last, i))
                last = None
                continue
            if last is None:
                last = i
            if self.end[t]:
                spans.append((last, i + 1))
                last = None
        if last is not None:
            spans.append((last, len(tokens)))
        rng.shuffle(spans)
        chosen, covered = [], 0
        for s in spans:
            if len(chosen) == self.plan.max_spans:
                break
            chosen.append(s)
            covered += s[1] - s[0]
            if covered >= int(self.cfg.gap_sentence_ratio * len(tokens)):
                break
        return self.blocks(tokens, sorted(chosen), rng, "sentence")

    def gpt(self, tokens: list[int], rng: random.Random, frac: float) -> tuple:
        ids, n = self.ids, len(tokens)
        hi = n - 2
        lo = min(int(self.cfg.gpt_min_ratio * n), hi)
        g = lo + min(int(frac * (hi - lo + 1)), hi - lo)
        first_eos = tokens.index(ids.eos) if ids.eos in tokens else -1
        if rng.random() < self.cfg.gpt_infill_prob or first_eos not in (-1, n - 1):
            d = n - g
            toks = tokens[:d] + [ids.gmask, ids.sop] + tokens[d : n - 1]
            labels = tokens[:d] + [ids.gmask] + tokens[d:]
            loss = [0.0] * (d + 1) + [0.0 if t == ids.cls else 1.0 for t in tokens[d:]]
            pos = list(range(d + 1)) + [d] * g
            block = [0] * (d + 1) + list(range(1, g + 1))
            return toks, labels, loss, pos, block, d + 1
        start = 1 + rng.randrange(n - 2 - g + 1)
        return self.blocks(tokens, [(start, start + g)], rng, "gpt")

    def blocks(
        self, tokens: list[int], spans: list[tuple[int, int]], rng: random.Random, objective: str
    ) -> tuple:
        ids = self.ids
        mask = {"bert": ids.mask, "sentence": ids.smask, "gpt": ids.gmask}[objective]
        position, p = [], 0
        covered = [False] * len(tokens)
        starts = set()
        for s, e in spans:
            starts.add(s)
            for i in range(s + 1, e):
                covered[i] = True
        part_a, mask_pos = [], {}
        for i, t in enumerate(tokens):
            if covered[i]:
                continue
            if i in starts:
                mask_pos[i] = p
                part_a.append(mask)
            else:
                part_a.append(t)
            position.append(p)
            p += 1
        order = list(spans)
        rng.shuffle(order)
        toks, labels, pos = list(part_a), list(part_a), list(position)
        block, loss = [0] * len(part_a), [0.0] * len(part_a)
        for s, e in order:
            toks.append(ids.sop)
            for i in range(s, e):
                hide = objective == "bert" and rng.random() < self.cfg.block_mask_prob
                toks.append(ids.mask if hide else tokens[i])
            for i in range(s, e):
                labels.append(tokens[i])
            labels.append(ids.eop)
            for w in range(e - s + 1):
                pos.append(mask_pos[s])
                block.append(w + 1)
                loss.append(1.0)
        return toks, labels, loss, pos, block, len(part_a)

    def pad(self, rows: list[tuple], objective: str) -> dict:
        L, pad = self.plan.input_length, self.ids.pad
        out = {"tokens": [], "labels": [], "loss_mask": [], "position_ids": [], "sep": []}
        for toks, labels, loss, pos, block, sep in rows:
            extra = L - len(toks)
            assert extra >= 0 and len(labels) == len(toks) == len(pos), (len(toks), L)
            out["tokens"].append(toks + [pad] * extra)
            out["labels"].append(labels + [pad] * extra)
            out["loss_mask"].append(loss + [0.0] * extra)
            out["position_ids"].append([pos + [0] * extra, block + [0] * extra])
            out["sep"].append(sep)
        batch = {
            k: torch.tensor(v, dtype=torch.float32 if k == "loss_mask" else torch.int64)
            for k, v in out.items()
        }
        batch["objective"] = objective
        batch["num_loss_tokens"] = int(batch["loss_mask"].sum())
        return batch


def check(batch: dict, b: int, L: int) -> None:
    assert batch["tokens"].shape == (b, L) and batch["position_ids"].shape == (b, 2, L)
    assert batch["labels"].shape == (b, L) and batch["loss_mask"].shape == (b, L)


def time_run(fn, batches: list[tuple[list, list]]) -> float:
    start = time.perf_counter()
    for raws, idx in batches:
        fn(raws, idx)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=21)
    parser.add_argument("--input-length", type=int, default=512, help="model input length L")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--interleaved", action="store_true", help="alternate the two sides per micro-batch"
    )
    args = parser.parse_args()
    cfg = BlankInfillingConfig(
        bert_prob=0.5,
        gap_sentence_prob=0.3,
        gpt_min_ratio=0.25,
        task_mask=True,
        block_mask_prob=0.1,
        short_seq_prob=0.02,
    )
    ids = synthetic_ids()
    ours = BlankInfillingCollator(cfg, ids, args.input_length, seed=1234)
    plan, b = ours.plan, args.micro_batch_size
    base = PerTokenBaseline(cfg, ids, plan, seed=1234)
    raws = synthetic_raw_samples(plan.raw_length, args.batches * b)
    batches = [
        (raws[j * b : (j + 1) * b], list(range(j * b, (j + 1) * b))) for j in range(args.batches)
    ]

    def run_ours(r, idx):
        batch = ours([{"text": x, "index": i} for x, i in zip(r, idx)])  # the training path
        check(batch, len(r), plan.input_length)

    for r, idx in batches[:5]:  # not timed: the sep rule of docs/blank-infilling.md#invariants
        for s in ours.make_samples(r, idx)[1]:
            assert s.sep == s.raw.size - int(s.span_lengths.sum()) + s.span_starts.size

    def run_base(r, idx):
        batch = base.collate(r, idx)
        check(batch, len(r), plan.input_length)

    # Each micro-batch is timed on its own and its best of --repeats kept. By default each repeat
    # runs all of ours, then all of the baseline (a data worker builds batch after batch, so that
    # is how the collator runs in training); the sides alternate every repeat so both see the same
    # drift in machine load. --interleaved alternates per micro-batch instead, which leaves each
    # side's caches cold after the other's batch (it costs ours more: it makes many numpy calls).
    ours_t = np.full(len(batches), np.inf)
    base_t = np.full(len(batches), np.inf)
    for _ in range(args.repeats):
        if args.interleaved:
            for j, (r, idx) in enumerate(batches):
                ours_t[j] = min(ours_t[j], time_run(run_ours, [(r, idx)]))
                base_t[j] = min(base_t[j], time_run(run_base, [(r, idx)]))
        else:
            for j, (r, idx) in enumerate(batches):
                ours_t[j] = min(ours_t[j], time_run(run_ours, [(r, idx)]))
            for j, (r, idx) in enumerate(batches):
                base_t[j] = min(base_t[j], time_run(run_base, [(r, idx)]))
    ours_rate = len(batches) * b / ours_t.sum()
    base_rate = len(batches) * b / base_t.sum()
    objectives = [ours.micro_batch_plan(idx[0])["objective"] for _, idx in batches]
    mix = {o: objectives.count(o) for o in ("bert", "sentence", "gpt")}
    print(
        f"seq {plan.input_length} (raw {plan.raw_length}, max spans {plan.max_spans}), micro-batch {b}, "
        f"10B mixture; torch {torch.__version__}, numpy {np.__version__}"
    )
    print(
        f"{len(batches)} micro-batches ({len(batches) * b} samples), objectives {mix}, "
        f"best of {args.repeats} per micro-batch, {'interleaved' if args.interleaved else 'blocks'}"
    )
    print(f"per-token Python baseline: {base_rate:9.1f} samples/s")
    print(f"megatron_glm collator:     {ours_rate:9.1f} samples/s")
    print(f"speed-up: {ours_rate / base_rate:.1f}x")
    assert math.isfinite(ours_rate)


if __name__ == "__main__":
    main()
