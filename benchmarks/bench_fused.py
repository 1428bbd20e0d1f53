"""Fused element-wise ops against their eager references: forward+backward CPU time per call and
the one-off compile time, in one process.

Run: ``python benchmarks/bench_fused.py [--rows 4096 --width 1024 --iters 10]``. Times are CPU
seconds (``time.process_time``, one intra-op thread), the fastest of ``--iters`` calls after two
warm-up calls; ratios are against the eager reference measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_glm.kernels import (  # noqa: E402
    bias_dropout_add,
    bias_dropout_add_reference,
    bias_gelu,
    bias_gelu_reference,
)


def _fastest(fn: Callable[[], torch.Tensor], iters: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn().sum().backward()  # first call: includes any compilation
    first = time.perf_counter() - start
    fn().sum().backward()
    best = float("inf")
    for _ in range(iters):
        start = time.process_time()
        fn().sum().backward()
        best = min(best, time.process_time() - start)
    return best, first


def _gelu_for_script(bias: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = y + bias
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def _bda_for_script(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, prob: float, training: bool
) -> torch.Tensor:
    return residual + torch.nn.functional.dropout(x + bias, p=prob, training=training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=1024, help="FFN width (bias-GeLU input)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden width (bias-dropout-add)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(args.rows, args.width, generator=g, requires_grad=True)
    b = torch.randn(args.width, generator=g, requires_grad=True)
    x = torch.randn(args.rows, args.hidden, generator=g, requires_grad=True)
    xb = torch.randn(args.hidden, generator=g, requires_grad=True)
    res = torch.randn(args.rows, args.hidden, generator=g)
    scripted_gelu = torch.jit.script(_gelu_for_script)
    scripted_bda = torch.jit.script(_bda_for_script)
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "bias_gelu reference (autograd of the formula)": lambda: bias_gelu_reference(b, y),
        "bias_gelu aten (F.gelu tanh)": lambda: bias_gelu(b, y, impl="aten"),
        "bias_gelu eager (analytic backward)": lambda: bias_gelu(b, y, impl="eager"),
        "bias_gelu compile": lambda: bias_gelu(b, y, impl="compile"),
        "bias_gelu torchscript": lambda: scripted_gelu(b, y),
        "bias_dropout_add reference": lambda: bias_dropout_add_reference(x, xb, res, 0.1, True),
        "bias_dropout_add compile": lambda: bias_dropout_add(x, xb, res, 0.1, True, "compile"),
        "bias_dropout_add torchscript": lambda: scripted_bda(x, xb, res, 0.1, True),
    }
    results = {}
    for name, fn in cases.items():
        best, first = _fastest(fn, args.iters)
        results[name] = {"cpu_s": best, "first_call_wall_s": first}
    print(f"rows {args.rows}, widths {args.width}/{args.hidden}, fwd+bwd, fastest CPU time")
    for name, r in results.items():
        op = name.split()[0]
        ref = results[
            f"{op} reference" + (" (autograd of the formula)" if op == "bias_gelu" else "")
        ]
        print(
            f"{name:48s} {r['cpu_s'] * 1e3:8.2f} ms  speed x {ref['cpu_s'] / r['cpu_s']:5.2f}  "
            f"first call {r['first_call_wall_s']:6.2f} s"
        )
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {"config": vars(args) | {"out": str(args.out)}, "results": results}, indent=2
            )
        )


if __name__ == "__main__":
    main()
