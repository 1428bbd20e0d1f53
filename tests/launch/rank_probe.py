"""A training hook for the launcher tests: every rank appends what it saw at each step to
``$GLM_RANK_PROBE_DIR/rank{r}.jsonl`` (the --log-json file has rank 0's view only).

Enabled with ``MEGATRON_GLM_HOOKS=tests.launch.rank_probe:register`` (megatron_glm.training.loop).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

PROBE_DIR_ENV = "GLM_RANK_PROBE_DIR"


def register(hooks: Any) -> None:
    out_dir = Path(os.environ[PROBE_DIR_ENV])
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_step_end(iteration: int, stats: Any) -> None:
        rank = dist.get_rank()
        record = {
            "rank": rank,
            "world_size": dist.get_world_size(),
            "env_world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ["LOCAL_RANK"]),
            "step": iteration,
            "loss": float(stats.loss),
        }
        with (out_dir / f"rank{rank}.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    hooks.on_step_end.append(on_step_end)
