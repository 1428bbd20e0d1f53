"""Pretrain GLM with DeepSpeed: ``deepspeed|torchrun|mpirun ... pretrain_glm.py [flags]``.

Launch it the way you like; the same command restarts a stopped job (it resumes from the newest
complete checkpoint under ``--load``)::

    deepspeed --num_gpus 8 pretrain_glm.py --preset large ... --deepspeed_config configs/ds_config.json
    torchrun --nproc-per-node 8 pretrain_glm.py ...
    mpirun -np 8 python pretrain_glm.py ...
    python pretrain_glm.py ...            # one process

The command line is validated before any process group exists: every problem is reported at
once and the exit status is 2. docs/training.md lists the flags.
"""

from __future__ import annotations

import logging
import sys


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"[%(asctime)s rank{rank} %(name)s %(levelname)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron_glm").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    from megatron_glm.training.launch import (
        discover_launch_env,
        init_distributed,
        shutdown_distributed,
    )

    try:
        launch = discover_launch_env()
    except ValueError as err:
        print(f"pretrain_glm.py: {err}", file=sys.stderr)
        return 2
    _setup_logging(launch.rank)

    from megatron_glm.training.arguments import ConfigError, parse_run_config

    try:
        run = parse_run_config(argv, launch.world_size)
    except ConfigError as err:
        if launch.rank == 0:
            print(f"pretrain_glm.py: {err}", file=sys.stderr)
        return 2

    from megatron_glm.training.loop import pretrain

    init_distributed()
    finished = False
    try:
        pretrain(run)
        finished = True
    finally:
        # A barrier before tearing down, but only after a clean finish (see shutdown_distributed).
        shutdown_distributed(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
