"""The one place that knows how ranks are laid out and which process groups exist.

``ParallelTopology`` is pure arithmetic (testable without ``torch.distributed``); its
``build_groups(rank)`` creates the ``torch.distributed`` groups and returns a ``ParallelGroups``,
which the model takes its ``tp_group`` from and which DeepSpeed takes as its ``mpu``.

Rank layout (Megatron's and DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)``
with axes ``pipe, data, model``, the last varying fastest)::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so tensor-parallel ranks are consecutive (the highest-bandwidth links within a node), then data,
then pipeline. Example, world 8 with tp 2, pp 2 (dp 2): TP groups [0,1] [2,3] [4,5] [6,7]; DP groups
[0,2] [1,3] [4,6] [5,7]; pipeline groups [0,4] [1,5] [2,6] [3,7]; stage 0 holds ranks 0-3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["ParallelCoordinates", "ParallelGroups", "ParallelTopology"]


@dataclass(frozen=True)
class ParallelCoordinates:
    """Where one rank sits: its index along each parallel dimension."""

    tp_rank: int
    dp_rank: int
    pp_rank: int


class ParallelTopology:
    """Validated parallel degrees and the rank <-> coordinate arithmetic. No communication."""

    def __init__(
        self,
        world_size: int,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
    ) -> None:
        degrees = {
            "world_size": world_size,
            "tensor_model_parallel_size": tensor_model_parallel_size,
            "pipeline_model_parallel_size": pipeline_model_parallel_size,
        }
        bad = {name: value for name, value in degrees.items() if value < 1}
        if bad:
            raise ValueError(f"parallel sizes must be >= 1, got {bad}")
        model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
        if world_size % model_parallel != 0:
            raise ValueError(
                f"world_size {world_size} is not divisible by tensor_model_parallel_size "
                f"{tensor_model_parallel_size} * pipeline_model_parallel_size "
                f"{pipeline_model_parallel_size} = {model_parallel}"
            )
        self.world_size = world_size
        self.tensor_model_parallel_size = tensor_model_parallel_size
        self.pipeline_model_parallel_size = pipeline_model_parallel_size
        self.data_parallel_size = world_size // model_parallel

    def __repr__(self) -> str:
        return (
            f"ParallelTopology(world_size={self.world_size}, "
            f"tp={self.tensor_model_parallel_size}, dp={self.data_parallel_size}, "
            f"pp={self.pipeline_model_parallel_size})"
        )

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size})")

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        """Global rank of the process at these coordinates."""
        tp, dp, pp = (
            self.tensor_model_parallel_size,
            self.data_parallel_size,
            self.pipeline_model_parallel_size,
        )
        if not (0 <= tp_rank < tp and 0 <= dp_rank < dp and 0 <= pp_rank < pp):
            raise ValueError(
                f"coordinates tp_rank={tp_rank}, dp_rank={dp_rank}, pp_rank={pp_rank} are "
                f"outside tp={tp}, dp={dp}, pp={pp}"
            )
        return (pp_rank * dp + dp_rank) * tp + tp_rank

    def coordinates(self, rank: int) -> ParallelCoordinates:
        self._check_rank(rank)
        tp, dp = self.tensor_model_parallel_size, self.data_parallel_size
        return ParallelCoordinates(
            tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp)
        )

    # Group member lists, each sorted, each list of lists in a fixed order (all ranks agree).

    def tensor_model_parallel_groups(self) -> list[list[int]]:
        """Ranks that share (dp_rank, pp_rank): one model replica's stage, split by TP."""
        tp, dp, pp = (
            self.tensor_model_parallel_size,
            self.data_parallel_size,
            self.pipeline_model_parallel_size,
        )
        return [[self.rank_of(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)]

    def data_parallel_groups(self) -> list[list[int]]:
        """Ranks that share (tp_rank, pp_rank): replicas whose gradients are averaged."""
        tp, dp, pp = (
            self.tensor_model_parallel_size,
            self.data_parallel_size,
            self.pipeline_model_parallel_size,
        )
        return [[self.rank_of(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)]

    def pipeline_model_parallel_groups(self) -> list[list[int]]:
        """Ranks that share (tp_rank, dp_rank), ordered by stage."""
        tp, dp, pp = (
            self.tensor_model_parallel_size,
            self.data_parallel_size,
            self.pipeline_model_parallel_size,
        )
        return [[self.rank_of(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks that share dp_rank: one whole model replica (all TP shards of all stages).

        DeepSpeed's meaning of "model parallel" (its pipeline grid's ``ds_model_proc_group``):
        gradient norms and overflow flags are reduced over it.
        """
        tp, dp, pp = (
            self.tensor_model_parallel_size,
            self.data_parallel_size,
            self.pipeline_model_parallel_size,
        )
        return [
            sorted(self.rank_of(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)
        ]

    def _member_list(self, groups: list[list[int]], rank: int) -> list[int]:
        self._check_rank(rank)
        for members in groups:
            if rank in members:
                return members
        raise AssertionError(f"rank {rank} is in no group of {groups}")  # layout invariant

    def tensor_model_parallel_ranks(self, rank: int) -> list[int]:
        return self._member_list(self.tensor_model_parallel_groups(), rank)

    def data_parallel_ranks(self, rank: int) -> list[int]:
        return self._member_list(self.data_parallel_groups(), rank)

    def pipeline_model_parallel_ranks(self, rank: int) -> list[int]:
        return self._member_list(self.pipeline_model_parallel_groups(), rank)

    def model_parallel_ranks(self, rank: int) -> list[int]:
        return self._member_list(self.model_parallel_groups(), rank)

    def to_deepspeed(self) -> Any:
        """The equal DeepSpeed topology, for ``PipelineModule(topology=...)``."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(
            num_pp=self.pipeline_model_parallel_size,
            num_mp=self.tensor_model_parallel_size,
            num_dp=self.data_parallel_size,
        )

    def build_groups(self, rank: int) -> ParallelGroups:
        """Create every process group; a collective: every rank must call it.

        ``torch.distributed`` must be initialised with this topology's world size. Every rank
        creates every group in the same order (``new_group`` requires it), keeping its own.
        """
        if not dist.is_initialized():
            raise RuntimeError("build_groups needs torch.distributed initialised first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"torch.distributed world size {dist.get_world_size()} != topology world_size "
                f"{self.world_size}"
            )
        if dist.get_rank() != rank:
            raise ValueError(f"rank {rank} != torch.distributed rank {dist.get_rank()}")
        mine: dict[str, tuple[list[int], dist.ProcessGroup]] = {}
        for kind, lists in (
            ("tp", self.tensor_model_parallel_groups()),
            ("dp", self.data_parallel_groups()),
            ("pp", self.pipeline_model_parallel_groups()),
            ("mp", self.model_parallel_groups()),
        ):
            for members in lists:
                group = dist.new_group(members)
                if rank in members:
                    mine[kind] = (members, group)
        if rank == 0:
            logger.info("process groups built for %s", self)
        return ParallelGroups(self, rank, mine)


class ParallelGroups:
    """This rank's process groups; also DeepSpeed's ``mpu`` (the ``get_*`` methods).

    ``tp_group`` is what the model takes; every group is a real ``ProcessGroup`` even when its size
    is 1 (``None`` means the *world* group to ``torch.distributed``, so it is never returned here;
    the TP layers treat a size-1 group like ``None``).
    """

    def __init__(
        self,
        topology: ParallelTopology,
        rank: int,
        groups: dict[str, tuple[list[int], dist.ProcessGroup]],
    ) -> None:
        self.topology = topology
        self.rank = rank
        self.coordinates = topology.coordinates(rank)
        self.tp_ranks, self.tp_group = groups["tp"]
        self.dp_ranks, self.dp_group = groups["dp"]
        self.pp_ranks, self.pp_group = groups["pp"]
        self.mp_ranks, self.mp_group = groups["mp"]

    def __repr__(self) -> str:
        c = self.coordinates
        return (
            f"ParallelGroups(rank={self.rank}, tp={c.tp_rank}/{self.tp_size}, "
            f"dp={c.dp_rank}/{self.dp_size}, pp={c.pp_rank}/{self.pp_size})"
        )

    @property
    def tp_rank(self) -> int:
        return self.coordinates.tp_rank

    @property
    def dp_rank(self) -> int:
        return self.coordinates.dp_rank

    @property
    def pp_rank(self) -> int:
        return self.coordinates.pp_rank

    @property
    def tp_size(self) -> int:
        return self.topology.tensor_model_parallel_size

    @property
    def dp_size(self) -> int:
        return self.topology.data_parallel_size

    @property
    def pp_size(self) -> int:
        return self.topology.pipeline_model_parallel_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """Global rank of the previous pipeline stage with the same tp/dp coordinates."""
        return None if self.is_first_stage else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_stage_rank(self) -> int | None:
        return None if self.is_last_stage else self.pp_ranks[self.pp_rank + 1]

    # --- DeepSpeed mpu interface (every mpu.get_* DeepSpeed 0.19.8 calls unconditionally or
    # prefers; the sequence-parallel ones are left out on purpose: DeepSpeed probes them with
    # hasattr and would switch to its Ulysses code paths).

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (the broadcast source)."""
        return self.tp_ranks[0]

    def get_slice_parallel_rank(self) -> int:
        return self.tp_rank

    def get_slice_parallel_world_size(self) -> int:
        return self.tp_size

    def get_slice_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipe_parallel_group(self) -> dist.ProcessGroup:
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.pp_group

    def get_model_parallel_rank(self) -> int:
        """Rank within the whole-replica group (tp x pp): ``pp_rank * tp + tp_rank``."""
        return self.mp_ranks.index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return len(self.mp_ranks)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.mp_group
