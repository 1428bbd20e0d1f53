"""One measurement per process, printed as a JSON line: what benchmarks/run_all.py runs in fresh
subprocesses (so each peak-memory figure starts from a clean heap and runs do not share caches).

``python benchmarks/measure.py step --impl ours --dtype bf16 --dropout 0.1 --seq 1024``
``python benchmarks/measure.py matmuls --dtype bf16 --seq 1024``
``python benchmarks/measure.py attention --dtype bf16 --seq 1024``
``python benchmarks/measure.py data -- <pretrain_glm.py flags>``

Times are CPU seconds of this process (``time.process_time``) with one intra-op thread: unlike
wall time they do not grow when other processes share the cores. Peak memory is the resident-set
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the first step)
minus the resident set before it. Shape legend: b batch, s sequence, h hidden, n heads, d head dim,
f FFN width, v vocab, t = b*s tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_glm import GLMConfig, GLMModel  # noqa: E402
from megatron_glm.kernels import attention, prepare_attention_mask  # noqa: E402
from megatron_glm.kernels.host import keep_freed_memory  # noqa: E402
from megatron_glm.kernels.matmul import gemm_in_fp32, matmul  # noqa: E402
from megatron_glm.model import glm_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def model_config(args: argparse.Namespace) -> GLMConfig:
    return GLMConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
        hidden_dropout=args.dropout,
        attention_dropout=args.dropout,
        attention_backend=args.backend,
        recompute_attention_core=not args.no_recompute,
    )


def glm_batch(
    b: int, s: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Part A / Part B batch (sep = s/2, one span): ids, 2D positions, sep, labels, loss mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    sep = torch.full((b,), s // 2)
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    pos[:, 0] = torch.arange(s).clamp(max=s // 2 - 1)
    pos[:, 1, s // 2 :] = torch.arange(1, s - s // 2 + 1)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    loss_mask = (torch.arange(s) >= s // 2).float().expand(b, s)
    return ids, pos, sep, labels, loss_mask


def _timed(step: Callable[[], None], warmup: int, steps: int) -> dict[str, Any]:
    rss_before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    for _ in range(warmup):
        step()
    times, wall = [], []
    for _ in range(steps):
        start, start_wall = time.process_time(), time.perf_counter()
        step()
        times.append(time.process_time() - start)
        wall.append(time.perf_counter() - start_wall)
    return {
        "times": times,
        "wall_times": wall,
        "peak_mb": (_status_kb("VmHWM") - rss_before) / 1024,
    }


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of the whole model with the masked loss (no optimizer)."""
    if args.keep_memory:
        keep_freed_memory()
    config = model_config(args)
    model = GLMModel(config)
    if args.impl == "baseline":
        from benchmarks.baseline import Baseline, ProductsInFp32, baseline_loss

        baseline = Baseline(config)
        baseline.load_state_dict(model.state_dict(), strict=True)
        model, loss_fn = baseline, baseline_loss
    else:

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> Any:
            return glm_loss(logits, labels, mask, None, mask.sum())

    model = model.to(DTYPES[args.dtype]).train()
    ids, pos, sep, labels, loss_mask = glm_batch(args.batch, args.seq, args.vocab)
    products: Any = contextlib.nullcontext()
    if args.impl == "baseline" and gemm_in_fp32(torch.empty(0, dtype=DTYPES[args.dtype])):
        products = ProductsInFp32()  # the products the model makes on this CPU (baseline.py)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with products:
            loss_fn(model(ids, pos, sep), labels, loss_mask).backward()

    return _timed(step, args.warmup, args.steps)


def step_matmuls(config: GLMConfig, b: int, s: int) -> list[tuple[str, int, int, int, int, int]]:
    """The model step's matrix products as (name, repeats per step, batch, m, k, n), forward and
    backward (a linear: y = x W^T, dx = dy W, dW = dy^T x; attention: the same for its two
    products, batched over the b*n heads of a layer)."""
    t, h, v = b * s, config.hidden_size, config.padded_vocab_size
    f = config.ffn_hidden_size
    assert f is not None
    layers, bn, d = config.num_layers, b * config.num_attention_heads, config.head_dim
    out: list[tuple[str, int, int, int, int, int]] = []
    for name, i, o, repeats in (
        ("query_key_value", h, 3 * h, layers),
        ("attention.dense", h, h, layers),
        ("dense_h_to_4h", h, f, layers),
        ("dense_4h_to_h", f, h, layers),
        ("lm_head", h, v, 1),
    ):
        out += [
            (f"{name} fwd", repeats, 1, t, i, o),
            (f"{name} dgrad", repeats, 1, t, o, i),
            (f"{name} wgrad", repeats, 1, o, t, i),
        ]
    out += [
        ("q k^T fwd", layers, bn, s, d, s),
        ("q k^T dgrad q", layers, bn, s, s, d),
        ("q k^T dgrad k", layers, bn, s, s, d),
        ("probs v fwd", layers, bn, s, s, d),
        ("probs v dgrad probs", layers, bn, s, d, s),
        ("probs v dgrad v", layers, bn, s, s, d),
    ]
    return out


def run_matmuls(args: argparse.Namespace) -> dict[str, Any]:
    """Each of the step's products alone at its shape (fastest of ``--steps``), and their FLOPs."""
    keep_freed_memory()
    config = model_config(args)
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    total_s, total_flops, parts = 0.0, 0, []
    for name, repeats, batch, m, k, n in step_matmuls(config, args.batch, args.seq):
        a = torch.randn(batch, m, k, generator=g).to(dtype)
        w = torch.randn(batch, k, n, generator=g).to(dtype)
        best = float("inf")
        for _ in range(args.warmup + args.steps):
            start = time.process_time()
            matmul(a, w)  # as the step multiplies (fp32 arithmetic where torch has no bf16 GEMM)
            best = min(best, time.process_time() - start)
        total_s += best * repeats
        total_flops += 2 * repeats * batch * m * k * n
        parts.append({"name": name, "repeats": repeats, "bmnk": [batch, m, n, k], "s": best})
    return {"matmul_s": total_s, "flops": total_flops, "parts": parts}


def run_attention(args: argparse.Namespace) -> dict[str, Any]:
    """``attention()`` alone, forward + backward, per backend, sep ratio and dropout."""
    keep_freed_memory()
    dtype = DTYPES[args.dtype]
    b, n, s, d = args.batch, args.heads, args.seq, args.hidden // args.heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(b, n, s, d, generator=g).to(dtype)
    results = []
    for dropout in (0.1, 0.0):
        for ratio in args.sep_ratios:
            sep = torch.full((b,), int(ratio * s))
            for name in ("dense", "fused", "fused+recompute", "sdpa"):
                backend = name.split("+")[0]
                mask = prepare_attention_mask(sep, s, s, backend, dropout > 0)

                def step(
                    mask: Any = mask, sep: torch.Tensor = sep, p: float = dropout, name: str = name
                ) -> None:
                    out = attention(
                        q,
                        k,
                        v,
                        sep,
                        dropout_p=p,
                        training=True,
                        mask=mask,
                        recompute=name.endswith("recompute"),
                    )
                    out.backward(grad)

                timing = _timed(step, args.warmup, args.steps)
                results.append(
                    {
                        "backend": name,
                        "sep_ratio": ratio,
                        "dropout": dropout,
                        "cpu_s": min(timing["times"]),
                    }
                )
    return {"results": results}


def run_data(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's data pipeline alone (dataset + blank-infilling collator, in this process):
    CPU seconds per micro-batch."""
    from megatron_glm.data.blank_infilling import BlankInfillingCollator
    from megatron_glm.data.glm_dataset import build_glm_datasets
    from megatron_glm.data.loader import build_pretraining_data_loader
    from megatron_glm.data.tokenizers import tokenizer_from_spec
    from megatron_glm.training.arguments import build_parser, build_run_config

    run = build_run_config(build_parser().parse_args(args.rest), 1)
    d = run.data
    tokenizer = tokenizer_from_spec(d.tokenizer_spec)
    micro = run.ds.micro_batch_size
    batches = args.warmup + args.steps
    train_ds, _, _ = build_glm_datasets(d, tokenizer, (batches * micro, 0, 0), splits=("train",))
    collator = BlankInfillingCollator(d.infilling, tokenizer, d.input_length, d.seed)
    loader = iter(
        build_pretraining_data_loader(train_ds, collator, micro, 0, 1, num_workers=0, seed=d.seed)
    )
    for _ in range(args.warmup):
        next(loader)
    start = time.process_time()
    for _ in range(args.steps):
        next(loader)
    seconds = (time.process_time() - start) / args.steps
    return {
        "cpu_s_per_micro_batch": seconds,
        "micro_batch": micro,
        "seq": d.input_length,
        "vocab_size": run.model.vocab_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["step", "matmuls", "attention", "data"])
    parser.add_argument("--impl", choices=["ours", "baseline"], default="ours")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--backend", default="auto", help="GLMConfig.attention_backend")
    parser.add_argument("--no-recompute", action="store_true", help="keep attention probs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sep-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument(
        "--keep-memory", action="store_true", help="keep_freed_memory() (the trainer's setting)"
    )
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.rest = argv[split + 1 :]  # data: the pretrain_glm.py flags
    torch.set_num_threads(1)
    run = {"step": run_step, "matmuls": run_matmuls, "attention": run_attention, "data": run_data}
    print(json.dumps(run[args.what](args)))


if __name__ == "__main__":
    main()
