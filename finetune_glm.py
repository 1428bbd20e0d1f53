"""Finetune GLM on a task: ``deepspeed|torchrun|mpirun ... finetune_glm.py --task NAME [flags]``.

Cloze classification (SuperGLUE BoolQ, CB, COPA, RTE, WiC and a generic format) and seq2seq
(source -> target, ROUGE by generation) on the pretraining loop: DeepSpeed, TP/PP, checkpoints and
exact resume (relaunch the same command), validation every ``--eval-interval`` iterations with the
best checkpoint kept in ``<save>/best``, and the final metrics in ``<save>/results.json``::

    deepspeed --num_gpus 8 finetune_glm.py --task boolq --data-dir data/BoolQ \\
        --load-pretrained checkpoints/glm-large --preset large --epochs 20 --pattern-id 0 \\
        --cloze-eval --seq-length 256 --save runs/boolq ... --deepspeed_config ds.json

Every pretraining flag applies (model, layout, schedule, checkpoints, tokenizer); the task flags
keep the official names. The command line and the task's files are validated before any process
group exists (every problem at once, exit status 2). The job runs like pretrain_glm.py's: the
``--save`` lock, SIGTERM/SIGINT saving and exiting 0, the exit statuses of
docs/failure-semantics.md. docs/finetuning.md is the reference.
"""

from __future__ import annotations

import sys

from pretrain_glm import _setup_logging


def main(argv: list[str] | None = None) -> int:
    from megatron_glm.training.launch import discover_launch_env

    try:
        launch = discover_launch_env()
    except ValueError as err:
        print(f"finetune_glm.py: {err}", file=sys.stderr)
        return 2
    _setup_logging(launch.rank)

    from megatron_glm.training.arguments import ConfigError, build_parser, build_run_config

    args = build_parser(finetune=True).parse_args(argv)
    world_size = args.dry_run_world_size or launch.world_size
    try:
        run = build_run_config(args, world_size)
    except ConfigError as err:
        if launch.rank == 0:
            print(f"finetune_glm.py: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        if launch.rank == 0:
            print(
                f"finetune_glm.py: dry run OK ({world_size} process(es), task {run.task.task}, "
                f"{run.training.train_iters} iterations); nothing was started"
            )
        return 0

    from megatron_glm.tasks.finetune import finetune
    from megatron_glm.training.job import run_job

    return run_job(run, launch, finetune, "finetune_glm.py")


if __name__ == "__main__":
    sys.exit(main())
