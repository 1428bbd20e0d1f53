"""Deterministic loading: same micro-batches with 0 and 2 workers, resume at consumed_samples gives
the tail of a full run, data-parallel ranks take disjoint slices, different seeds differ."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_glm.config.data import BlankInfillingConfig
from megatron_glm.data.blank_infilling import BlankInfillingCollator
from megatron_glm.data.glm_dataset import GLMDataset
from megatron_glm.data.loader import PretrainingBatchSampler, build_pretraining_data_loader
from tests.data.test_blank_infilling import ToyTokenizer
from tests.data.test_glm_dataset import write_toy_dataset

SEQ, MICRO = 96, 4
KEYS = ("tokens", "labels", "loss_mask", "position_ids", "sep")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("loader") / "docs")
    write_toy_dataset(prefix, 40, seed=0, max_len=150)
    cfg = BlankInfillingConfig(bert_prob=0.5, gap_sentence_prob=0.3, short_seq_prob=0.1)
    collator = BlankInfillingCollator(cfg, ToyTokenizer(), SEQ, seed=21)
    dataset = GLMDataset(
        prefix,
        (0, 40),
        collator.plan.raw_length,
        seed=21,
        cls_id=ToyTokenizer.cls_id,
        eos_id=ToyTokenizer.eos_id,
    )
    return dataset, collator, cfg


def take(loader, count):
    return list(itertools.islice(iter(loader), count))


def same(a, b) -> bool:
    return a["objective"] == b["objective"] and all(torch.equal(a[k], b[k]) for k in KEYS)


def test_workers_and_resume_give_identical_batches(setup):
    dataset, collator, _ = setup
    steps = 12  # more than one epoch of the toy dataset
    assert steps * MICRO * 2 > dataset.samples_per_epoch
    full = take(
        build_pretraining_data_loader(dataset, collator, MICRO, 1, 2, 0, num_workers=0), steps
    )
    workers = take(
        build_pretraining_data_loader(dataset, collator, MICRO, 1, 2, 0, num_workers=2), steps
    )
    assert all(same(a, b) for a, b in zip(full, workers))
    resumed = take(
        build_pretraining_data_loader(
            dataset, collator, MICRO, 1, 2, consumed_samples=5 * MICRO * 2, num_workers=2
        ),
        7,
    )
    assert all(same(a, b) for a, b in zip(full[5:], resumed))
    assert len({b["objective"] for b in full}) > 1
    for b in full:
        assert b["tokens"].shape == (MICRO, SEQ) and b["position_ids"].shape == (MICRO, 2, SEQ)


def test_data_parallel_ranks_take_disjoint_slices(setup):
    dataset, collator, _ = setup
    samplers = [iter(PretrainingBatchSampler(MICRO, r, 3, consumed_samples=24)) for r in range(3)]
    for step in range(4):
        batches = [next(s) for s in samplers]
        flat = [i for b in batches for i in b]
        assert flat == list(range(24 + step * 12, 24 + (step + 1) * 12))
    # rank r's micro-batch equals the same global samples collated on their own
    loader = build_pretraining_data_loader(dataset, collator, MICRO, 2, 3, 0, num_workers=0)
    first = next(iter(loader))
    direct = collator([dataset[i] for i in range(2 * MICRO, 3 * MICRO)])
    assert same(first, direct)
    with pytest.raises(ValueError, match="multiple"):
        PretrainingBatchSampler(MICRO, 0, 3, consumed_samples=5)
    with pytest.raises(ValueError, match="dp_rank"):
        PretrainingBatchSampler(MICRO, 3, 3)


def test_different_seeds_differ(setup):
    dataset, collator, cfg = setup
    other = BlankInfillingCollator(cfg, ToyTokenizer(), SEQ, seed=22)
    a = take(build_pretraining_data_loader(dataset, collator, MICRO, 0, 1, 0), 3)
    b = take(build_pretraining_data_loader(dataset, other, MICRO, 0, 1, 0), 3)
    assert not all(same(x, y) for x, y in zip(a, b))
    finite = build_pretraining_data_loader(dataset, collator, MICRO, 0, 1, 8, total_samples=40)
    assert len(finite) == 8 and len(list(finite)) == 8
