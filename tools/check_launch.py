"""Check a launch before training: every rank joins, an all-reduce adds up, ranks agree.

Start it exactly as you would start ``pretrain_glm.py`` (same launcher, hosts, ports)::

    deepspeed --num_gpus 2 tools/check_launch.py
    torchrun --nproc-per-node 2 tools/check_launch.py
    mpirun -np 2 python tools/check_launch.py

Each rank prints one JSON line (rank, world size, local rank, node, master, launcher, the all-reduce
result); the exit status is non-zero when the sum is wrong or the ranks disagree about the world.
If this hangs or fails, the problem is the launch (hosts, ports, firewall), not the trainer.
``--json-out DIR`` also writes ``DIR/rank{r}.json`` (used by the launcher tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_glm.training.launch import init_distributed, shutdown_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", type=Path, default=None, help="also write DIR/rank{r}.json")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl on CUDA)")
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    launch = init_distributed(backend=args.backend, timeout_s=args.timeout)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    total = torch.tensor([float(launch.rank + 1)], device=device)
    dist.all_reduce(total)
    expected = launch.world_size * (launch.world_size + 1) / 2
    views: list[tuple[int, int, str] | None] = [None] * launch.world_size
    dist.all_gather_object(views, (launch.rank, launch.world_size, socket.gethostname()))
    record = {
        "rank": launch.rank,
        "world_size": launch.world_size,
        "local_rank": launch.local_rank,
        "local_world_size": launch.local_world_size,
        "host": socket.gethostname(),
        "master": f"{launch.master_addr}:{launch.master_port}",
        "launcher": launch.launcher,
        "backend": dist.get_backend(),
        "all_reduce": total.item(),
        "ok": total.item() == expected
        and [view[0] for view in views if view] == list(range(launch.world_size))
        and all(view is not None and view[1] == launch.world_size for view in views),
    }
    print(json.dumps(record), flush=True)
    if args.json_out is not None:
        args.json_out.mkdir(parents=True, exist_ok=True)
        (args.json_out / f"rank{launch.rank}.json").write_text(json.dumps(record) + "\n")
    shutdown_distributed()
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
