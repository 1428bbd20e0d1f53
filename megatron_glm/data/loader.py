"""Deterministic, resumable pretraining data loading (Megatron-style sampling).

The global sample order is 0, 1, 2, ...; global micro-step t covers samples
``[consumed + t*G, consumed + (t+1)*G)`` with ``G = micro_batch_size * dp_size``, and data-parallel
rank r takes the r-th slice of ``micro_batch_size`` samples. The dataset shuffles internally and is
a pure function of the sample index; the collator's randomness is a pure function of the sample
indices it receives. So the micro-batches do not depend on the number of workers, and resuming at
``consumed_samples`` gives exactly the tail of an uninterrupted run.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


class PretrainingBatchSampler:
    """Index lists for one data-parallel rank, from ``consumed_samples`` on; endless unless
    ``total_samples`` is given (the dataset wraps around epochs by itself)."""

    def __init__(
        self,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        total_samples: int | None = None,
    ) -> None:
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(
                f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be positive"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        global_size = micro_batch_size * dp_size
        if consumed_samples % global_size:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) is not a multiple of micro_batch_size * "
                f"dp_size ({micro_batch_size} * {dp_size}); resume only at micro-step boundaries"
            )
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.consumed_samples = consumed_samples
        self.total_samples = total_samples

    def __iter__(self) -> Iterator[list[int]]:
        g = self.micro_batch_size * self.dp_size
        steps = (
            itertools.count()
            if self.total_samples is None
            else range((self.total_samples - self.consumed_samples) // g)
        )
        for t in steps:
            first = self.consumed_samples + t * g + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an endless sampler has no length")
        return (self.total_samples - self.consumed_samples) // (
            self.micro_batch_size * self.dp_size
        )


def build_pretraining_data_loader(
    dataset: Any,
    collator: Callable[[list[Any]], Any],
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    num_workers: int = 0,
    seed: int = 1234,
    total_samples: int | None = None,
) -> DataLoader:
    """A ``DataLoader`` yielding this rank's micro-batches (the collator's dicts) in order.

    ``seed`` seeds torch's worker base seed only (nothing here draws from it: the dataset and the
    collator carry their own seeds), so workers are reproducible too. Workers are torch's; with
    ``num_workers > 0`` batches still come back in sampler order.
    """
    sampler = PretrainingBatchSampler(
        micro_batch_size, dp_rank, dp_size, consumed_samples, total_samples
    )
    generator = torch.Generator()
    generator.manual_seed(seed)
    logger.info(
        "data loader: rank %d/%d, micro batch %d, from sample %d, %d workers",
        dp_rank,
        dp_size,
        micro_batch_size,
        consumed_samples,
        num_workers,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        generator=generator,
        pin_memory=False,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
