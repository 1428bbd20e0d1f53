"""Attention backends inside the GLM model: the default CPU path (SDPA with the sep mask) against
the dense reference (materialised scores, -65504 masking, softmax, dropout).

For every (sequence length, dtype, backend) one fresh subprocess builds a small GLMModel, runs
``--warmup`` and then ``--steps`` forward+backward steps (loss = masked vocab CE) and reports:

- tokens/s: batch * seq / the fastest step's *CPU time* (``time.process_time``) over all steps of
  all ``--rounds`` (subprocesses of the two backends alternate). With one intra-op thread (the
  default) CPU time is the compute the step needed, and unlike wall time it does not grow when
  other processes share the cores; wall times are kept in the JSON too;
- peak memory: the process's resident-set high-water mark (``VmHWM``) during the steps minus the
  resident set just before them (model, optimizer-free, inputs already allocated). The high-water
  mark is reset through ``/proc/self/clear_refs`` right before the first step, so imports and model
  construction do not count. This is what the OS had to provide for one training step's
  activations and temporaries (glibc may keep freed pages, so it is an upper bound on live tensors
  and it is the number that decides whether a step fits in RAM).

Results are printed as a table with sdpa/dense ratios from the same run, and written as JSON with
``--out``. Run: ``python benchmarks/bench_attention.py --out runs/bench_attention.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from megatron_glm import GLMConfig, GLMModel
    from megatron_glm.model import glm_loss

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    config = GLMConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        hidden_dropout=0.0,
        attention_dropout=args.attention_dropout,
        attention_backend=args.backend,
    )
    model = GLMModel(config).to(dtype).train()
    b, s = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (b, s), generator=g)
    sep = torch.full((b,), s // 2)
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    pos[:, 0] = torch.arange(s).clamp(max=s // 2 - 1)
    pos[:, 1, s // 2 :] = torch.arange(1, s - s // 2 + 1)
    labels = torch.randint(0, args.vocab, (b, s), generator=g)
    mask = (torch.arange(s) >= s // 2).float().expand(b, s)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = glm_loss(model(ids, pos, sep), labels, mask, None, mask.sum())
        loss.backward()

    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(args.warmup):
        step()
    times, wall_times = [], []
    for _ in range(args.steps):
        start, start_wall = time.process_time(), time.perf_counter()
        step()
        times.append(time.process_time() - start)
        wall_times.append(time.perf_counter() - start_wall)
    peak_kb = _status_kb("VmHWM") - rss_before
    return {
        "seq": s,
        "dtype": args.dtype,
        "backend": args.backend,
        "batch": b,
        "peak_mb": peak_kb / 1024,
        "times": times,
        "wall_times": wall_times,
    }


def _child_cmd(args: argparse.Namespace, seq: int, dtype: str, backend: str) -> list[str]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--seq",
        str(seq),
        "--dtype",
        dtype,
        "--backend",
        backend,
    ]
    for name in (
        "layers",
        "hidden",
        "heads",
        "vocab",
        "batch",
        "steps",
        "warmup",
        "threads",
        "attention_dropout",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--backends", nargs="+", default=["dense", "sdpa"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per config")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention-dropout", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for round_index in range(args.rounds):
        for dtype in args.dtypes:
            for seq in args.seqs:
                for backend in args.backends:
                    proc = subprocess.run(
                        _child_cmd(args, seq, dtype, backend),
                        env=env,
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if proc.returncode != 0:
                        raise SystemExit(f"{dtype} seq {seq} {backend} failed:\n{proc.stderr}")
                    run = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs.setdefault((dtype, seq, backend), []).append(run)
                    print(
                        f"  round {round_index} {dtype} seq {seq:5d} {backend:6s} fastest "
                        f"{min(run['times']):.3f} CPU-s peak {run['peak_mb']:8.1f} MB",
                        file=sys.stderr,
                        flush=True,
                    )
    results = []
    for (dtype, seq, backend), group in runs.items():
        times = [t for run in group for t in run["times"]]
        wall_times = [t for run in group for t in run["wall_times"]]
        results.append(
            {
                "seq": seq,
                "dtype": dtype,
                "backend": backend,
                "cpu_step_s_min": min(times),
                "cpu_step_s_median": statistics.median(times),
                "tokens_per_s": args.batch * seq / min(times),
                # the high-water mark hardly varies between rounds; the smallest is the least noisy
                "peak_mb": min(run["peak_mb"] for run in group),
                "cpu_times": times,
                "wall_times": wall_times,
            }
        )

    base = args.backends[0]
    print(
        f"\nmodel: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, batch "
        f"{args.batch}, vocab {args.vocab}, attention dropout {args.attention_dropout}, "
        f"{args.threads} thread(s); fastest of {args.rounds} x {args.steps} fwd+bwd steps, tok/s per CPU-second"
    )
    header = (
        f"{'dtype':5} {'seq':>5} {'backend':8} {'tok/s':>9} {'peak MB':>9} "
        f"{'speed x':>8} {'memory x':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for r in results:
        ref = next(
            x
            for x in results
            if (x["seq"], x["dtype"], x["backend"]) == (r["seq"], r["dtype"], base)
        )
        r["speed_vs_" + base] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["memory_vs_" + base] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
        mem = r["memory_vs_" + base]
        print(
            f"{r['dtype']:5} {r['seq']:5d} {r['backend']:8} {r['tokens_per_s']:9.1f} "
            f"{r['peak_mb']:9.1f} {r['speed_vs_' + base]:8.2f} "
            f"{'n/a' if mem is None else f'{mem:.2f}':>9}"
        )
        rows.append(r)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"config": vars(args) | {"out": str(args.out)}, "results": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
