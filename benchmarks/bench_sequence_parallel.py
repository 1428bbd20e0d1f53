"""Sequence parallelism: activation memory of a TP 2 training step with and without it.

For every (sequence length, dropout) two fresh pairs of gloo processes (tensor parallel size 2,
one intra-op thread each) build the same GLMModel, once with ``sequence_parallel=False`` and once
with ``True``, and run forward + backward with the vocab-parallel loss. Per rank:

- **saved activations**: the bytes of the distinct tensors autograd keeps from the forward for the
  backward (counted through ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded):
  exactly the memory sequence parallelism is designed to cut, deterministic to the byte;
- **peak memory**: the resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) during the first step minus the resident set before it: what the OS
  had to provide for one step, temporaries and communication buffers included. Only the first
  step of a fresh process: later steps reuse freed heap memory in whatever pattern the allocator
  leaves, which moves their high-water mark by tens of MB either way;
- **step time**: wall seconds of the fastest of the steps after the first (the two ranks share the
  cores with the gloo transport: a CPU figure of the communication overhead, not a GPU one).

Ratios are SP / no-SP from the same run. Defaults: the issue-9 model (4 layers, hidden 512, 8 heads,
vocab 8192, batch 2) in fp32 at sequence 1024 and 2048, dropout 0.1 and 0, default attention
backend. Run: ``python benchmarks/bench_sequence_parallel.py --out runs/bench_sp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_glm import GLMConfig, GLMModel  # noqa: E402
from megatron_glm.model import glm_loss  # noqa: E402
from megatron_glm.parallel.random import model_parallel_seed  # noqa: E402

TP = 2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class SavedActivations:
    """Bytes of the distinct storages saved for backward while active (parameters excluded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def _batch(args: argparse.Namespace, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = args.batch
    sep = torch.full((b,), seq // 2)
    positions = torch.zeros(b, 2, seq, dtype=torch.long)
    positions[:, 0] = torch.arange(seq)
    positions[:, 1, seq // 2 :] = torch.arange(1, seq - seq // 2 + 1)
    return {
        "ids": torch.randint(0, args.vocab, (b, seq), generator=g),
        "positions": positions,
        "sep": sep,
        "labels": torch.randint(0, args.vocab, (b, seq), generator=g),
        "loss_mask": torch.ones(b, seq),
    }


def _worker(
    rank: int, port: int, args: argparse.Namespace, seq: int, dropout: float, sp: bool, queue: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=TP)
    group = dist.new_group(list(range(TP)))
    model_parallel_seed(1234, rank)
    config = GLMConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_sequence_length=seq,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        sequence_parallel=sp,
    )
    model = GLMModel(config, group).train()
    data = _batch(args, seq)
    saved = SavedActivations(model)

    def step() -> None:
        saved.storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            logits = model(data["ids"], data["positions"], data["sep"])
            loss = glm_loss(logits, data["labels"], data["loss_mask"], group, float(seq))
        loss.backward()
        model.zero_grad(set_to_none=True)

    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak_mb = (_status_kb("VmHWM") - rss_before) / 1024
    times = []
    for _ in range(args.steps):
        dist.barrier(group)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    queue.put(
        {"rank": rank, "saved_mb": saved.bytes / 2**20, "peak_mb": peak_mb, "step_s": min(times)}
    )
    dist.destroy_process_group()


def _measure(args: argparse.Namespace, seq: int, dropout: float, sp: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        ctx.Process(target=_worker, args=(rank, port, args, seq, dropout, sp, queue))
        for rank in range(TP)
    ]
    for proc in procs:
        proc.start()
    reports = [queue.get(timeout=args.timeout) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a rank exited with {proc.exitcode}")
    # the ranks hold equal shares; report the larger of each figure
    return {key: max(r[key] for r in reports) for key in ("saved_mb", "peak_mb", "step_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.1, 0.0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    for dropout in args.dropouts:
        for seq in args.seqs:
            tp, sp = _measure(args, seq, dropout, False), _measure(args, seq, dropout, True)
            rows.append({"seq": seq, "dropout": dropout, "tp": tp, "sp": sp})
            print(json.dumps(rows[-1]), flush=True)

    print(
        "\n| dropout | seq | saved MB TP2 | saved MB TP2+SP | saved x | peak MB TP2 | "
        "peak MB TP2+SP | peak x | step s TP2 | step s TP2+SP |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tp, sp = r["tp"], r["sp"]
        print(
            f"| {r['dropout']} | {r['seq']} | {tp['saved_mb']:.1f} | {sp['saved_mb']:.1f} | "
            f"{sp['saved_mb'] / tp['saved_mb']:.2f} | {tp['peak_mb']:.1f} | {sp['peak_mb']:.1f} | "
            f"{sp['peak_mb'] / tp['peak_mb']:.2f} | {tp['step_s']:.2f} | {sp['step_s']:.2f} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), **vars(args)}
        meta["out"] = str(args.out)
        args.out.write_text(json.dumps({"config": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
