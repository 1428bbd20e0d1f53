"""Blank infilling: every constructed sample checked against the invariants of
docs/blank-infilling.md#invariants by an independent checker (it parses Part B by its [sop] tokens,
not from the collator's span records), the span statistics, the fixed-shape rule, determinism and
the ablation switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_glm.config.data import BlankInfillingConfig, plan_for_raw_length
from megatron_glm.data.blank_infilling import (
    BlankInfillingCollator,
    InfilledSample,
    fixed_shape_plan,
)

# ---- test doubles -----------------------------------------------------------------------------

PERIOD, NEWLINE, FIRST_WORD = 10, 11, 12


class ToyTokenizer:
    """Word-level stand-in with the GLMTokenizer interface: ids 0..9 are command tokens, 10 is '.',
    11 a newline (both end sentences), words from 12 on."""

    pad_id, eos_id, cls_id, mask_id, smask_id, gmask_id = 0, 1, 2, 3, 4, 5
    sop_id, eop_id, unk_id, sep_id = 6, 7, 8, 9
    NAMES = [
        "[pad]",
        "[eos]",
        "[CLS]",
        "[MASK]",
        "[sMASK]",
        "[gMASK]",
        "[sop]",
        "[eop]",
        "[UNK]",
        "[SEP]",
        ".",
        "\\n",
    ]

    def __init__(self, vocab_size: int = 500) -> None:
        self.vocab_size = vocab_size

    def sentence_end_mask(self) -> np.ndarray:
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[[PERIOD, NEWLINE]] = True
        return mask

    def decode(self, ids) -> str:
        return " ".join(self.NAMES[i] if i < len(self.NAMES) else f"w{i}" for i in ids)

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]


def toy_document(rng: np.random.Generator, length: int, vocab_size: int = 500) -> np.ndarray:
    """Words with a sentence end every ~12 tokens (some newlines)."""
    doc = rng.integers(FIRST_WORD, vocab_size, size=length)
    ends = rng.random(length) < 1 / 12
    doc[ends] = np.where(rng.random(int(ends.sum())) < 0.8, PERIOD, NEWLINE)
    return doc


def toy_raw_samples(
    seed: int, n: int, count: int, multi_doc_share: float = 0.5
) -> list[np.ndarray]:
    """Raw samples shaped like the packer's: [CLS] doc [eos] [CLS] doc ..., cut at n tokens."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        parts, size = [], 0
        multi = rng.random() < multi_doc_share
        while size < n:
            length = int(rng.integers(20, 120)) if multi else n
            piece = [[ToyTokenizer.cls_id], toy_document(rng, length), [ToyTokenizer.eos_id]]
            parts += piece
            size += length + 2
        samples.append(np.concatenate(parts)[:n].astype(np.int64))
    return samples


# ---- the independent invariant checker ---------------------------------------------------------


def check_sample(s: InfilledSample, objective: str, col: BlankInfillingCollator) -> dict[str, int]:
    """Assert every invariant (docs/blank-infilling.md#invariants) on one sample; return its span stats."""
    ids, cfg = col.ids, col.config
    raw, n = s.raw, s.raw.size
    tokens, labels, loss, pos = s.tokens, s.labels, s.loss_mask, s.position_ids
    total = tokens.size
    assert labels.size == loss.size == pos.shape[1] == total and pos.shape[0] == 2
    assert total <= col.plan.input_length, "sample does not fit the fixed shape"
    sep = s.sep
    part_a = tokens[:sep]
    assert np.array_equal(labels[:sep], part_a), "Part A labels are Part A"
    assert np.all(loss[:sep] == 0)
    assert np.array_equal(pos[0, :sep], np.arange(sep)) and np.all(pos[1, :sep] == 0)

    if s.suffix:  # gpt suffix form
        assert objective == "gpt"
        g = total - sep
        d = n - g
        mask = ids.gmask if cfg.task_mask else ids.mask
        assert sep == n - g + 1
        assert np.array_equal(part_a, np.concatenate((raw[:d], [mask])))
        assert tokens[sep] == ids.sop and np.array_equal(tokens[sep + 1 :], raw[d : n - 1])
        assert np.array_equal(labels[sep:], raw[d:])
        assert np.array_equal(loss[sep:], (raw[d:] != ids.cls).astype(np.float32))
        assert np.all(pos[0, sep:] == d)
        block = np.arange(1, g + 1) if cfg.block_position_encoding else np.ones(g)
        assert np.array_equal(pos[1, sep:], block)
        assert min(int(cfg.gpt_min_ratio * n), n - 2) <= g <= n - 2
        eos_inside = np.flatnonzero(raw == ids.eos)
        if not (eos_inside.size and eos_inside[0] != n - 1):  # single document: no [eos] input
            assert ids.eos not in tokens[sep:].tolist()
        return {"k": 1, "covered": g}

    # Part A masks, in left-to-right order
    sentinel_masks = {int(ids.sentinel_mask(i)) for i in range(col.plan.max_spans)}
    mask_ids = {ids.mask, ids.smask, ids.gmask} | (sentinel_masks if cfg.sentinel_token else set())
    mask_pos = [p for p in range(sep) if int(part_a[p]) in mask_ids]
    # Part B segments, parsed by their [sop] tokens
    sops = (
        {int(ids.sentinel_sop(i)) for i in range(col.plan.max_spans)}
        if cfg.sentinel_token
        else {ids.sop}
    )
    b_inputs, b_labels = tokens[sep:], labels[sep:]
    seg_starts = [j for j in range(b_inputs.size) if int(b_inputs[j]) in sops]
    assert (not seg_starts and b_inputs.size == 0) or seg_starts[0] == 0
    k = len(seg_starts)
    assert len(mask_pos) == k, "exactly one mask token per span"
    spans: dict[int, np.ndarray] = {}
    keys: list[int] = []
    seg_bounds = seg_starts + [b_inputs.size]
    for idx in range(k):
        lo, hi = seg_bounds[idx], seg_bounds[idx + 1]
        seg_in, seg_lab = b_inputs[lo:hi], b_labels[lo:hi]
        length = hi - lo - 1
        assert length >= 1 and seg_lab[-1] == ids.eop
        span = seg_lab[:-1]
        shifted_ok = (
            (seg_in[1:] == span) | (seg_in[1:] == (ids.dblock or ids.mask))
            if (cfg.block_mask_prob > 0 and objective == "bert")
            else seg_in[1:] == span
        )
        assert np.all(shifted_ok), "Part B input is [sop] + span"
        assert ids.eos not in seg_in.tolist(), "no [eos] inside a Part B input"
        assert np.all(loss[sep + lo : sep + hi] == 1)
        abs_pos = pos[0, sep + lo : sep + hi]
        assert np.all(abs_pos == abs_pos[0])
        block = np.arange(1, length + 2) if cfg.block_position_encoding else np.ones(length + 1)
        assert np.array_equal(pos[1, sep + lo : sep + hi], block)
        if not cfg.sentinel_token:
            key = int(abs_pos[0])
        else:
            assert abs_pos[0] == col.plan.raw_length  # official: position --seq-length
            if objective == "bert":  # [MASK{idx}] names the segment
                key = next(p for p in mask_pos if part_a[p] == ids.sentinel_mask(idx))
            else:  # task masks carry no number: use the recorded Part B order
                key = mask_pos[int(s.order[idx])]
        assert key in mask_pos and key not in spans, "Part B segments biject with mask positions"
        spans[key] = span
        keys.append(key)
    if not cfg.shuffle_blocks:
        assert keys == sorted(keys), "shuffling off: Part B left to right"
    # substitute the spans back: the raw sample
    rebuilt, starts, lengths = [], [], []
    last = 0
    for p in mask_pos:
        rebuilt.append(part_a[last:p])
        starts.append(sum(x.size for x in rebuilt))
        rebuilt.append(spans[p])
        lengths.append(spans[p].size)
        last = p + 1
    rebuilt.append(part_a[last:])
    assert np.array_equal(np.concatenate(rebuilt), raw), (
        "substituting the spans back gives the raw sample"
    )
    assert sep == n - sum(lengths) + k
    for a, la in zip(starts, lengths):
        covered = raw[a : a + la]
        if objective in ("bert", "gpt"):
            assert ids.cls not in covered.tolist() and ids.eos not in covered.tolist()
            assert a + la <= n - 1, "the sample's last token is never covered"
            assert a >= 1
    if objective == "bert":
        for (a, la), b in zip(zip(starts, lengths), starts[1:]):
            assert b > a + la, ">= 1 unmasked token between spans"
    if objective == "sentence":
        end = ids.sentence_end
        for a, la in zip(starts, lengths):
            assert raw[a - 1] in (ids.cls, ids.eos) or end[raw[a - 1]], "starts a sentence"
            last_tok = raw[a + la - 1]
            assert end[last_tok] or a + la == n or raw[a + la] in (ids.cls, ids.eos), "ends one"
            assert not np.any(end[raw[a : a + la - 1]]), "one whole sentence"
    return {"k": k, "covered": int(sum(lengths)), "lengths": lengths}


def check_batch(batch: dict, col: BlankInfillingCollator, samples: list[InfilledSample]) -> None:
    b, L = len(samples), col.plan.input_length
    assert batch["tokens"].shape == (b, L) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].shape == (b, L) and batch["position_ids"].shape == (b, 2, L)
    assert batch["loss_mask"].dtype == torch.float32 and batch["sep"].shape == (b,)
    for row, s in enumerate(samples):
        t = s.tokens.size
        assert torch.all(batch["tokens"][row, t:] == col.ids.pad), "padding uses the pad id"
        assert torch.all(batch["labels"][row, t:] == col.ids.pad)
        assert torch.all(batch["loss_mask"][row, t:] == 0)
        assert int(batch["sep"][row]) == s.sep
        assert np.array_equal(batch["tokens"][row, :t].numpy(), s.tokens)
    assert batch["num_loss_tokens"] == int(batch["loss_mask"].sum())


def run_objective(
    cfg: BlankInfillingConfig,
    seq_length: int,
    num_samples: int,
    seed: int = 7,
    micro_batch: int = 16,
    multi_doc_share: float = 0.5,
) -> tuple[list[dict], set[str]]:
    col = BlankInfillingCollator(cfg, ToyTokenizer(), seq_length, seed)
    raws = toy_raw_samples(seed, col.plan.raw_length, num_samples, multi_doc_share)
    stats, objectives = [], set()
    for first in range(0, num_samples, micro_batch):
        idx = list(range(first, min(first + micro_batch, num_samples)))
        objective, samples = col.make_samples([raws[i] for i in idx], idx)
        objectives.add(objective)
        batch = col([{"text": raws[i], "index": i} for i in idx])  # the training path
        assert batch["objective"] == objective
        check_batch(batch, col, samples)
        for s in samples:
            stats.append(check_sample(s, objective, col))
    return stats, objectives


# ---- tests ------------------------------------------------------------------------------------


def test_bert_invariants_and_statistics_seq512():
    stats, objectives = run_objective(BlankInfillingConfig(bert_prob=1.0), 512, 1024)
    assert objectives == {"bert"}
    n = fixed_shape_plan(512, BlankInfillingConfig()).raw_length
    lengths = np.concatenate([s["lengths"] for s in stats])
    assert abs(lengths.mean() - 3.16) < 0.1, lengths.mean()
    assert lengths.min() >= 1 and lengths.max() <= 39
    assert min(s["covered"] for s in stats) >= int(0.15 * n), "masked fraction >= 15%"


def test_sentence_invariants_with_task_mask():
    cfg = BlankInfillingConfig(bert_prob=0.0, gap_sentence_prob=1.0, task_mask=True)
    stats, objectives = run_objective(cfg, 256, 1008)
    assert objectives == {"sentence"}
    n = fixed_shape_plan(256, cfg).raw_length
    covered = np.array([s["covered"] for s in stats])
    assert np.mean(covered >= int(0.15 * n)) > 0.99


@pytest.mark.parametrize("multi_doc_share", [0.0, 1.0])
def test_gpt_invariants(multi_doc_share):
    cfg = BlankInfillingConfig(bert_prob=0.0, gpt_min_ratio=0.25, task_mask=True)
    stats, objectives = run_objective(cfg, 128, 1008, multi_doc_share=multi_doc_share)
    assert objectives == {"gpt"}
    n = fixed_shape_plan(128, cfg).raw_length
    g = np.array([s["covered"] for s in stats])
    assert g.min() >= int(0.25 * n) and g.max() <= n - 2


def test_mixture_10b_and_short_sequences():
    cfg = BlankInfillingConfig(
        bert_prob=0.5,
        gap_sentence_prob=0.3,
        gpt_min_ratio=0.25,
        task_mask=True,
        short_seq_prob=0.3,
        block_mask_prob=0.1,
    )
    _, objectives = run_objective(cfg, 256, 640)
    assert objectives == {"bert", "sentence", "gpt"}


@pytest.mark.parametrize("objective", ["bert", "sentence", "gpt"])
def test_ablations_no_shuffle_no_block_position_sentinel(objective):
    probs = {"bert": (1.0, 0.0), "sentence": (0.0, 1.0), "gpt": (0.0, 0.0)}[objective]
    for sentinel in (False, True):
        cfg = BlankInfillingConfig(
            bert_prob=probs[0],
            gap_sentence_prob=probs[1],
            shuffle_blocks=False,
            block_position_encoding=False,
            sentinel_token=sentinel,
            gpt_infill_prob=0.0,
        )
        run_objective(cfg, 128, 96, multi_doc_share=0.0)


def test_shuffle_changes_order_and_single_span():
    cfg = BlankInfillingConfig(bert_prob=1.0)
    col = BlankInfillingCollator(cfg, ToyTokenizer(), 256, 3)
    raw = toy_raw_samples(0, col.plan.raw_length, 1)[0]
    orders = [col.build_sample(raw, i, "bert").order for i in range(20)]
    assert any(not np.array_equal(o, np.sort(o)) for o in orders), "spans are shuffled"
    single = BlankInfillingCollator(
        BlankInfillingConfig(bert_prob=0.0, single_span_prob=1.0), ToyTokenizer(), 256, 3
    )
    objective, samples = single.make_samples([raw] * 4, [0, 1, 2, 3])
    assert objective == "bert" and all(s.span_starts.size == 1 for s in samples)


def test_fixed_shape_rule_holds_in_the_worst_case():
    """Spans of length 1 and one-token sentences push k to the cap: n + 2k must still fit."""
    for seq in (64, 128, 512):
        cfg = BlankInfillingConfig(bert_prob=0.0, gap_sentence_prob=1.0)
        col = BlankInfillingCollator(cfg, ToyTokenizer(), seq, 0)
        n, big_k = col.plan.raw_length, col.plan.max_spans
        assert n + 2 * big_k <= seq
        raw = np.full(n, PERIOD, dtype=np.int64)  # every token a sentence
        raw[0] = ToyTokenizer.cls_id
        s = col.build_sample(raw, 0, "sentence")
        assert s.span_starts.size == min(max(1, int(0.15 * n)), big_k) and s.tokens.size <= seq
        check_sample(s, "sentence", col)
        # the bert cap: force the cap with a tiny average span length
        tiny = BlankInfillingCollator(
            BlankInfillingConfig(bert_prob=1.0, avg_block_length=0.05), ToyTokenizer(), seq, 0
        )
        raw = toy_raw_samples(1, tiny.plan.raw_length, 1, multi_doc_share=0.0)[0]
        s = tiny.build_sample(raw, 0, "bert")
        assert s.tokens.size <= seq and s.span_lengths.sum() >= int(0.15 * tiny.plan.raw_length)
        check_sample(s, "bert", tiny)


def test_crowded_short_documents_never_drop_samples():
    col = BlankInfillingCollator(BlankInfillingConfig(bert_prob=1.0), ToyTokenizer(), 128, 0)
    n = col.plan.raw_length
    raw = np.tile([ToyTokenizer.cls_id, 20, 21, 22, ToyTokenizer.eos_id], n)[:n].astype(np.int64)
    _, samples = col.make_samples([raw] * 8, list(range(8)))
    assert len(samples) == 8
    for s in samples:
        check_sample(s, "bert", col)


def test_masking_is_a_pure_function_of_seed_and_index():
    cfg = BlankInfillingConfig(bert_prob=0.4, gap_sentence_prob=0.3, short_seq_prob=0.2)
    raws = toy_raw_samples(5, fixed_shape_plan(128, cfg).raw_length, 8)
    a = BlankInfillingCollator(cfg, ToyTokenizer(), 128, seed=11)
    b = BlankInfillingCollator(cfg, ToyTokenizer(), 128, seed=11)
    c = BlankInfillingCollator(cfg, ToyTokenizer(), 128, seed=12)
    batch = [{"text": r, "index": 40 + i} for i, r in enumerate(raws)]
    x, y, z = a(batch), b(list(batch)), c(batch)
    for key in ("tokens", "labels", "loss_mask", "position_ids", "sep"):
        assert torch.equal(x[key], y[key])
    assert x["objective"] == y["objective"]
    assert any(not torch.equal(x[k], z[k]) for k in ("tokens", "position_ids"))
    # a sample's masking does not depend on its neighbours, given the micro-batch's objective
    for objective in ("bert", "sentence", "gpt"):
        plan = {
            "objective": objective,
            "short": False,
            "target": 0,
            "single": False,
            "gpt_fraction": 0.3,
        }
        _, together = a.make_samples(raws, list(range(40, 48)), plan)
        alone = a.build_sample(raws[3], 43, objective, gpt_fraction=0.3)
        assert np.array_equal(together[3].tokens, alone.tokens)
        assert np.array_equal(together[3].position_ids, alone.position_ids)
        _, shifted = a.make_samples(raws[2:5], [42, 43, 44], plan)
        assert np.array_equal(shifted[1].labels, alone.labels)
    objectives = {a.make_samples(raws[:2], [i, i + 1])[0] for i in range(0, 400, 2)}
    assert objectives == {"bert", "sentence", "gpt"}


def test_objective_frequencies_follow_the_probabilities():
    cfg = BlankInfillingConfig(bert_prob=0.5, gap_sentence_prob=0.3)
    col = BlankInfillingCollator(cfg, ToyTokenizer(), 64, 1)
    draws = [col.micro_batch_plan(i * 4)["objective"] for i in range(4000)]
    freq = {o: draws.count(o) / len(draws) for o in ("bert", "sentence", "gpt")}
    assert abs(freq["bert"] - 0.5) < 0.03 and abs(freq["sentence"] - 0.3) < 0.03


def test_config_validation():
    with pytest.raises(ValueError, match="bert_prob"):
        BlankInfillingConfig(bert_prob=0.8, gap_sentence_prob=0.3)
    with pytest.raises(ValueError, match="gpt_min_ratio"):
        BlankInfillingConfig(gpt_min_ratio=1.5)
    with pytest.raises(ValueError, match="input length 8 is too short"):
        fixed_shape_plan(8, BlankInfillingConfig())
    with pytest.raises(ValueError, match="seq_length 7 is too short"):
        plan_for_raw_length(7, BlankInfillingConfig())


@pytest.mark.parametrize("raw_length", [9, 64, 200, 512, 1024])
def test_raw_length_plan_round_trips(raw_length):
    """--seq-length is the raw length n; the input length n + 2K(n) maps back to n exactly, and a
    bert sample of n tokens always fits it."""
    cfg = BlankInfillingConfig()
    plan = plan_for_raw_length(raw_length, cfg)
    assert plan.input_length == raw_length + 2 * plan.max_spans
    assert fixed_shape_plan(plan.input_length, cfg) == plan
    assert fixed_shape_plan(plan.input_length - 1, cfg).raw_length == raw_length - 1
