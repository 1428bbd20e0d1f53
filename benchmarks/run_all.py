"""Every speed and memory figure of docs/performance.md in one command, each a ratio measured in the
same run: ``python benchmarks/run_all.py [--quick]``.

Sections (each measurement in a fresh ``benchmarks/measure.py`` subprocess, one intra-op thread,
CPU seconds; ours and the baseline alternate):

- ``step``: the model step (forward + backward + loss, no optimizer) of a 4-layer, 512-hidden,
  8-head GLM, vocab 8192, batch 2, at sequence 512/1024/2048, dropout 0.1 and 0, fp32 and bf16
  (model cast to the dtype, as DeepSpeed's bf16 does), ours against benchmarks/baseline.py (the
  official code's eager step): tokens/s and peak memory. Ours runs as the trainer does
  (``keep_freed_memory``); the baseline with glibc's defaults, and once more with the same allocator
  setting (``baseline+keep``) so the allocator's share is visible.
- ``matmuls``: the step's own matrix products timed alone (same shapes, forward and backward):
  model FLOP/s of the step as a fraction of that rate.
- ``attention``: ``attention()`` alone per backend and ``sep`` ratio.
- ``e2e``: ``pretrain_glm.py`` (data, DeepSpeed, optimizer, logging) against the model step alone
  at the same size, and the data pipeline's samples/s against what the step consumes.

Writes the JSON (``--out``) and the tables between the markers of ``--readme``, with machine and
date. ``--quick`` (seq 1024 only, fewer steps; a few minutes) checks the pipeline end to end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MEASURE = REPO / "benchmarks" / "measure.py"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"
TOKENIZER = REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model"
CORPUS = REPO / "data" / "python-docs-en.jsonl.gz"
BATCH = 2
FULL_SEQS = [512, 1024, 2048]  # the step and matmul sections' lengths without --quick / --seqs


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def measure(*args: str) -> dict[str, Any]:
    """One ``measure.py`` run; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(MEASURE), *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    import torch

    from megatron_glm.kernels.matmul import gemm_in_fp32

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
        flags = re.search(r"flags\s*:\s*(.+)", cpuinfo.read_text())
        wanted = ("avx512f", "avx512_bf16", "amx_bf16", "avx2")
        extras = [f for f in wanted if flags and f in flags.group(1).split()]
        cpu += f" ({', '.join(extras)})" if extras else ""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "bf16_products": "fp32" if gemm_in_fp32(torch.empty(0, dtype=torch.bfloat16)) else "native",
    }


# ---- the model step --------------------------------------------------------------------------


def step_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    impls = [("baseline", []), ("ours", ["--keep-memory"])]
    flip = False
    for _ in range(args.rounds):
        for seq in args.seqs:
            for dropout in (0.1, 0.0):
                for dtype in ("fp32", "bf16"):
                    extra = [("baseline+keep", ["--impl", "baseline", "--keep-memory"])]
                    order = [(name, ["--impl", name, *flags]) for name, flags in impls]
                    if seq == args.keep_seq:
                        order += extra
                    if flip:  # alternate which side goes first
                        order.reverse()
                    flip = not flip
                    for name, flags in order:
                        result = measure(
                            "step",
                            *flags,
                            "--dtype",
                            dtype,
                            "--dropout",
                            str(dropout),
                            "--seq",
                            str(seq),
                            "--warmup",
                            str(args.warmup),
                            "--steps",
                            str(args.steps),
                        )
                        runs.setdefault((seq, dropout, dtype, name), []).append(result)
                        print(
                            f"  step seq {seq} dropout {dropout} {dtype} {name}: "
                            f"{min(result['times']):.3f} CPU-s, peak {result['peak_mb']:.0f} MB",
                            file=sys.stderr,
                            flush=True,
                        )
    rows = []
    for (seq, dropout, dtype, name), group in runs.items():
        best = min(t for run in group for t in run["times"])
        rows.append(
            {
                "seq": seq,
                "dropout": dropout,
                "dtype": dtype,
                "impl": name,
                "cpu_step_s": best,
                "tokens_per_s": BATCH * seq / best,
                "peak_mb": min(run["peak_mb"] for run in group),
                "cpu_times": [t for run in group for t in run["times"]],
            }
        )
    return rows


def matmul_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for seq in args.seqs:
        for dtype in ("fp32", "bf16"):
            result = measure("matmuls", "--dtype", dtype, "--seq", str(seq), "--steps", "3")
            rows.append({"seq": seq, "dtype": dtype, **result})
    return rows


def attention_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    result = measure(
        "attention", "--dtype", "bf16", "--seq", str(args.attention_seq), "--steps", str(args.steps)
    )
    return [{"seq": args.attention_seq, "dtype": "bf16", **r} for r in result["results"]]


# ---- end to end --------------------------------------------------------------------------------


def _dataset(cache: Path) -> Path:
    prefix = cache / "pydocs"
    if not (cache / "pydocs_text_document.idx").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "preprocess_data.py"),
                "--input",
                str(CORPUS),
                "--output-prefix",
                str(prefix),
                "--append-eod",
                "--workers",
                "1",
                "--no-progress",
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                str(TOKENIZER),
            ],
            env=_env(),
            check=True,
            capture_output=True,
        )
    return cache / "pydocs_text_document"


def _pretrain_flags(data: Path, ds_config: Path, iters: int, raw_seq: int) -> list[str]:
    return [
        "--num-layers",
        "4",
        "--hidden-size",
        "512",
        "--num-attention-heads",
        "8",
        "--seq-length",
        str(raw_seq),
        "--max-position-embeddings",
        "1024",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(TOKENIZER),
        "--data-path",
        str(data),
        "--train-iters",
        str(iters),
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--no-progress-bar",
        "--deepspeed_config",
        str(ds_config),
    ]


def _pretrain_cpu_s(flags: list[str], workdir: Path) -> float:
    """CPU seconds (user + system) of a whole ``pretrain_glm.py`` process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)})
    proc = subprocess.run(
        [sys.executable, str(REPO / "pretrain_glm.py"), *flags],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"pretrain_glm.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def e2e_section(args: argparse.Namespace) -> dict[str, Any]:
    """Trainer CPU time per iteration from two runs of different length (the difference removes
    start-up), against the model step alone and the data pipeline alone at the same size."""
    cache = Path(args.cache)
    data = _dataset(cache)
    with tempfile.TemporaryDirectory() as tmp:
        ds_config = Path(tmp) / "ds.json"
        ds_config.write_text(
            json.dumps(
                {
                    "train_batch_size": BATCH,
                    "train_micro_batch_size_per_gpu": BATCH,
                    "bf16": {"enabled": True},
                    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
                    "gradient_clipping": 1.0,
                }
            )
        )
        short, long = args.e2e_iters
        flags = _pretrain_flags(data, ds_config, long, args.raw_seq)
        data_result = measure("data", "--steps", "20", "--", *flags)
        seq, vocab = data_result["seq"], data_result["vocab_size"]
        step_flags = ["--keep-memory", "--dtype", "bf16", "--dropout", "0.1", "--seq", str(seq)]
        step_flags += ["--vocab", str(vocab), "--warmup", "1", "--steps", str(args.steps + 1)]
        step_times = measure("step", *step_flags)["times"]
        # A first run builds what later runs reuse (DeepSpeed's compiled CPU op, the dataset's
        # index caches): it would make the first measured run look slower. Not counted.
        _pretrain_cpu_s(_pretrain_flags(data, ds_config, 1, args.raw_seq), Path(tmp))
        cpu_short = _pretrain_cpu_s(
            _pretrain_flags(data, ds_config, short, args.raw_seq), Path(tmp)
        )
        cpu_long = _pretrain_cpu_s(flags, Path(tmp))
        # the step alone again, after the trainer runs: the load of a shared machine changes
        step_times += measure("step", *step_flags)["times"]
    per_iter = (cpu_long - cpu_short) / (long - short)
    step_s = min(step_times)
    return {
        "seq": seq,
        "vocab_size": vocab,
        "iters": [short, long],
        "trainer_cpu_s_per_iter": per_iter,
        "trainer_tokens_per_s": BATCH * seq / per_iter,
        "step_cpu_s": step_s,
        "step_tokens_per_s": BATCH * seq / step_s,
        "trainer_vs_step": step_s / per_iter,
        "data_cpu_s_per_micro_batch": data_result["cpu_s_per_micro_batch"],
        "data_samples_per_s": BATCH / data_result["cpu_s_per_micro_batch"],
        "step_samples_per_s": BATCH / step_s,
    }


# ---- report --------------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **keys: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def tables(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Measured {m['date_utc']} UTC on {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['load_average'][0]:.1f} at the end; "
        f"`{result['command']}`. One intra-op thread, CPU seconds (fastest step).",
        "",
    ]
    if m.get("bf16_products") == "fp32":
        lines += [
            "torch has no bf16 matrix product for this CPU (no AVX512): every bf16 product below, "
            "the baseline's, ours and the matmuls timed alone, is computed in fp32 on bf16 "
            "operands and rounded once (megatron_glm/kernels/matmul.py), so bf16 saves memory "
            "and bandwidth here, not arithmetic.",
            "",
        ]
    steps, matmuls = result.get("step", []), result.get("matmuls", [])
    if steps:
        lines += [
            "**Model step** (tokens/s; x = ratio to the baseline's fp32 step at the same sequence "
            "and dropout; memory = peak RSS above the model, ratio to the baseline in the same "
            "dtype):",
            "",
            "| seq | dropout | baseline fp32 tok/s | ours fp32 x | baseline bf16 x | ours bf16 x "
            "| baseline+keep bf16 x | mem baseline fp32 / bf16 MB | mem ours fp32 x | "
            "mem ours bf16 x |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for seq in sorted({r["seq"] for r in steps}):
            for dropout in (0.1, 0.0):
                base32 = _find(steps, seq=seq, dropout=dropout, dtype="fp32", impl="baseline")
                base16 = _find(steps, seq=seq, dropout=dropout, dtype="bf16", impl="baseline")
                ours32 = _find(steps, seq=seq, dropout=dropout, dtype="fp32", impl="ours")
                ours16 = _find(steps, seq=seq, dropout=dropout, dtype="bf16", impl="ours")
                keep16 = _find(steps, seq=seq, dropout=dropout, dtype="bf16", impl="baseline+keep")
                if None in (base32, base16, ours32, ours16):
                    continue
                ref = base32["tokens_per_s"]
                keep = f"{keep16['tokens_per_s'] / ref:.2f}" if keep16 else "-"
                lines.append(
                    f"| {seq} | {dropout} | {ref:.0f} | {ours32['tokens_per_s'] / ref:.2f} | "
                    f"{base16['tokens_per_s'] / ref:.2f} | "
                    f"**{ours16['tokens_per_s'] / ref:.2f}** | {keep} | "
                    f"{base32['peak_mb']:.0f} / {base16['peak_mb']:.0f} | "
                    f"{ours32['peak_mb'] / base32['peak_mb']:.2f} | "
                    f"**{ours16['peak_mb'] / base16['peak_mb']:.2f}** |"
                )
        lines.append("")
    if matmuls and steps:
        lines += [
            "**Efficiency**: the step's model FLOPs (forward + backward of every matrix product, "
            "full s x s attention, no recomputation counted) per CPU-second, as a fraction of the "
            "rate of the same products timed alone:",
            "",
            "| seq | dtype | matmul rate TFLOP/s | dropout | ours | baseline |",
            "|---|---|---|---|---|---|",
        ]
        for mm in matmuls:
            rate = mm["flops"] / mm["matmul_s"] / 1e12
            for dropout in (0.1, 0.0):
                ours = _find(steps, seq=mm["seq"], dtype=mm["dtype"], dropout=dropout, impl="ours")
                base = _find(
                    steps, seq=mm["seq"], dtype=mm["dtype"], dropout=dropout, impl="baseline"
                )
                if ours is None or base is None:
                    continue
                lines.append(
                    f"| {mm['seq']} | {mm['dtype']} | {rate:.3f} | {dropout} | "
                    f"**{mm['matmul_s'] / ours['cpu_step_s']:.0%}** | "
                    f"{mm['matmul_s'] / base['cpu_step_s']:.0%} |"
                )
        lines.append("")
    attention = result.get("attention", [])
    if attention:
        seq = attention[0]["seq"]
        names = list(dict.fromkeys(r["backend"] for r in attention))
        lines += [
            f"**Attention alone** (bf16, b {BATCH}, 8 heads, seq {seq}, head dim 64, forward + "
            "backward, ms; x = speed against `dense`):",
            "",
            "| dropout | sep / s | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for dropout in (0.1, 0.0):
            for ratio in sorted({r["sep_ratio"] for r in attention}):
                cells = []
                dense = _find(attention, dropout=dropout, sep_ratio=ratio, backend="dense")
                for name in names:
                    r = _find(attention, dropout=dropout, sep_ratio=ratio, backend=name)
                    assert r is not None and dense is not None
                    cells.append(f"{r['cpu_s'] * 1e3:.0f} ({dense['cpu_s'] / r['cpu_s']:.2f}x)")
                lines.append(f"| {dropout} | {ratio} | " + " | ".join(cells) + " |")
        lines.append("")
    e2e = result.get("e2e")
    if e2e:
        lines += [
            f"**End to end** (`pretrain_glm.py`, same model, bf16, dropout 0.1, micro batch "
            f"{BATCH}, input length {e2e['seq']}, vocab {e2e['vocab_size']}, no data workers; CPU "
            f"time per iteration from runs of {e2e['iters'][0]} and {e2e['iters'][1]} iterations): "
            f"trainer {e2e['trainer_tokens_per_s']:.0f} tok/s against the model step alone "
            f"{e2e['step_tokens_per_s']:.0f} tok/s = **{e2e['trainer_vs_step']:.2f}**. Data "
            f"pipeline alone {e2e['data_samples_per_s']:.0f} samples/s against "
            f"{e2e['step_samples_per_s']:.1f} samples/s consumed by the step "
            f"({e2e['data_samples_per_s'] / e2e['step_samples_per_s']:.0f}x headroom).",
            "",
        ]
    return "\n".join(lines)


def write_readme(path: Path, text: str) -> None:
    content = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content and END in content:
        content = re.sub(
            re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, content, count=1, flags=re.S
        )
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(content, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seq 1024 only, fewer steps")
    parser.add_argument("--sections", nargs="+", default=["step", "matmuls", "attention", "e2e"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_all.json")
    parser.add_argument("--readme", type=Path, default=REPO / "benchmarks" / "README.md")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the step section")
    parser.add_argument(
        "--seqs",
        type=int,
        nargs="+",
        help="sequence lengths of step/matmuls (default 512 1024 2048)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="rerun --sections into the existing --out JSON (step/matmuls: only the rows of --seqs)",
    )
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench_cache"))
    args = parser.parse_args()
    args.seqs = args.seqs or ([1024] if args.quick else FULL_SEQS)
    args.keep_seq = 1024
    args.warmup, args.steps = 1, 1 if args.quick else 2
    args.attention_seq = 1024
    args.raw_seq = 870  # blank infilling makes inputs of about 1024 from it
    args.e2e_iters = (2, 6) if args.quick else (3, 11)

    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    command += f" --seqs {' '.join(map(str, args.seqs))}" if args.seqs != FULL_SEQS else ""
    result: dict[str, Any] = {"command": command}
    if args.update and args.out.exists():  # keep the other sections of an earlier run
        result = json.loads(args.out.read_text(encoding="utf-8"))
        rerun = f"{command} --sections {' '.join(args.sections)} --rounds {args.rounds} --update"
        result["command"] += f"; then {rerun}"
    sections = {
        "step": step_section,
        "matmuls": matmul_section,
        "attention": attention_section,
        "e2e": e2e_section,
    }
    for name in args.sections:
        print(f"{name} ...", file=sys.stderr, flush=True)
        fresh = sections[name](args)
        if args.update and name in ("step", "matmuls"):  # keep the other sequence lengths' rows
            fresh = [r for r in result.get(name, []) if r["seq"] not in args.seqs] + fresh
        result[name] = fresh
    result["machine"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    text = tables(result)
    print(text)
    if not args.no_readme:
        write_readme(args.readme, text)


if __name__ == "__main__":
    main()
