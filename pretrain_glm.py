"""Pretrain GLM with DeepSpeed: ``deepspeed|torchrun|mpirun ... pretrain_glm.py [flags]``.

Launch it the way you like; the same command restarts a stopped job (it resumes from the newest
complete checkpoint under ``--load``)::

    deepspeed --num_gpus 8 pretrain_glm.py --preset large ... --deepspeed_config configs/ds_config.json
    torchrun --nproc-per-node 8 pretrain_glm.py ...
    mpirun -np 8 python pretrain_glm.py ...
    python pretrain_glm.py ...            # one process

The command line is validated before any process group exists: every problem is reported at
once and the exit status is 2; ``--dry-run`` stops there and prints the resolved configuration.
SIGTERM/SIGINT (to a launcher or a rank) stops the job after the current iteration with a save
and status 0; docs/failure-semantics.md lists the other exit statuses.
The official GLM recipes' and Megatron's flags are accepted (docs/compatibility.md);
docs/training.md lists the flags.
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
    """The exit status is one of ``megatron_glm.training.guards.ExitCode``
    (docs/failure-semantics.md)."""
    from megatron_glm.training.launch import discover_launch_env

    try:
        launch = discover_launch_env()
    except ValueError as err:
        print(f"pretrain_glm.py: {err}", file=sys.stderr)
        return 2
    _setup_logging(launch.rank)

    from megatron_glm.training.arguments import ConfigError, build_parser, build_run_config

    args = build_parser().parse_args(argv)
    world_size = args.dry_run_world_size or launch.world_size
    try:
        run = build_run_config(args, world_size)
    except ConfigError as err:
        if launch.rank == 0:
            print(f"pretrain_glm.py: {err}", file=sys.stderr)
        return 2

    from megatron_glm.training.summary import describe_run

    if args.dry_run:
        if launch.rank == 0:
            print(describe_run(run))
            print(f"pretrain_glm.py: dry run OK ({world_size} process(es)); nothing was started")
        return 0
    if launch.rank == 0:
        logging.getLogger("pretrain_glm").info("configuration:\n%s", describe_run(run))

    from megatron_glm.training.job import run_job

    return run_job(run, launch)


if __name__ == "__main__":
    sys.exit(main())
