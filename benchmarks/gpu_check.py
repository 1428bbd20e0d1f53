"""The checks of benchmarks/gpu_check.sh, one per invocation: ``python benchmarks/gpu_check.py PART``.

Parts: ``flex`` (flex attention forward and backward against the dense reference), ``nccl`` (the
model over an NCCL process group of world size 1 equals the CPU model), ``fp16`` (pretrain_glm.py in
fp16 with dynamic loss scaling: overflowing steps are skipped and halve the scale, then the loss
falls), ``apex`` (FusedLayerNorm equals torch's LayerNorm and is what the model builds, when apex
imports), ``mfu`` (model TFLOP/s and MFU of the 2B preset at sequence 2048 in bf16, dropout 0.1 and
0). Each prints one JSON line ``{"part", "ok", ...}`` and exits non-zero when a check fails.

``--dry-run`` runs the same code on CPU at toy sizes (gloo instead of NCCL, flex forward only,
fp16 and apex reported as skipped) so the script can be tested without a GPU.
Shape legend: b batch, n heads, s sequence, d head dim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatron_glm import GLMConfig, GLMModel  # noqa: E402
from megatron_glm.kernels import attention, make_layer_norm  # noqa: E402
from megatron_glm.model import glm_loss  # noqa: E402
from megatron_glm.training.metrics import flops_per_token  # noqa: E402

H200_BF16_PEAK_TFLOPS = 989.0  # dense bf16, as the H100 SXM


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on CPU")
    return torch.device("cuda")


def check_flex(dry_run: bool) -> dict[str, Any]:
    device = _device(dry_run)
    torch.backends.cuda.matmul.allow_tf32 = False
    b, n, s, d = (2, 2, 64, 16) if dry_run else (2, 16, 2048, 64)
    worst: dict[str, float] = {}
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for sep_list in ([0, s // 2], [s, 1], [s // 3, 2 * s // 3]):
            sep = torch.tensor(sep_list, device=device)
            q, k, v = (torch.randn(b, n, s, d, generator=g).to(device, dtype) for _ in range(3))
            grad = torch.randn(b, n, s, d, generator=g).to(device, dtype)
            results = {}
            for backend in ("dense", "flex"):
                leaves = [t.clone().requires_grad_(not dry_run) for t in (q, k, v)]
                out = attention(*leaves, sep, backend=backend)
                grads = []
                if not dry_run:  # torch has no CPU backward for flex
                    out.backward(grad)
                    grads = [t.grad.float() for t in leaves]
                results[backend] = [out.detach().float(), *grads]
            for i, (got, want) in enumerate(zip(results["flex"], results["dense"])):
                key = f"{dtype}:{['out', 'dq', 'dk', 'dv'][i]}"
                # relative to the largest entry: gradients of a 2048-key softmax are not O(1)
                error = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
                worst[key] = max(worst.get(key, 0.0), error)
            worst[f"{dtype}:tol"] = tol
    ok = all(
        value <= worst[f"{key.split(':')[0]}:tol"]
        for key, value in worst.items()
        if not key.endswith(":tol")
    )
    return {"ok": ok, "max_rel_diff": worst}


def _toy_config(**overrides: Any) -> GLMConfig:
    return GLMConfig.from_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, **overrides)


def _batch(config: GLMConfig, b: int, s: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=g)
    sep = torch.tensor([s // 2 if i % 2 == 0 else s - 3 for i in range(b)])
    pos = torch.zeros(b, 2, s, dtype=torch.long)
    for i, cut in enumerate(sep.tolist()):
        pos[i, 0, :cut] = torch.arange(cut)
        pos[i, 0, cut:] = cut - 1
        pos[i, 1, cut:] = torch.arange(1, s - cut + 1)
    labels = torch.randint(0, config.vocab_size, (b, s), generator=g)
    loss_mask = (torch.arange(s) >= sep.view(-1, 1)).float()
    return ids, pos, sep, labels, loss_mask


def _loss_and_grads(
    model: GLMModel, batch: tuple[torch.Tensor, ...], device: torch.device, group: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, pos, sep, labels, loss_mask = (t.to(device) for t in batch)
    loss = glm_loss(model(ids, pos, sep), labels, loss_mask, group, loss_mask.sum())
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}


def check_nccl(dry_run: bool) -> dict[str, Any]:
    import torch.distributed as dist

    device = _device(dry_run)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 500))
    dist.init_process_group("gloo" if dry_run else "nccl", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        probe = torch.arange(4.0, device=device)
        dist.all_reduce(probe, group=group)
        config = _toy_config(attention_backend="sdpa")
        batch = _batch(config, 2, 32)
        reference = GLMModel(config).train()
        ref_loss, ref_grads = _loss_and_grads(reference, batch, torch.device("cpu"), None)
        model = GLMModel(config, group).to(device).train()
        loss, grads = _loss_and_grads(model, batch, device, group)
    finally:
        dist.destroy_process_group()
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    loss_diff = abs(loss.item() - ref_loss.item())
    ok = probe.tolist() == [0.0, 1.0, 2.0, 3.0] and loss_diff < 1e-5 and worst < 1e-4
    return {"ok": ok, "loss_cpu": ref_loss.item(), "loss_diff": loss_diff, "max_grad_diff": worst}


def check_fp16(dry_run: bool) -> dict[str, Any]:
    # On CPU (dry run) the same launch in bf16, for 6 iterations: fp16 needs CUDA or a CPU with
    # native fp16, but the launch, the data and the log parsing are the same.
    precision = (
        {"bf16": {"enabled": True}}
        if dry_run
        # 2^20 overflows the first steps; hysteresis 1: each overflow halves the scale
        else {"fp16": {"enabled": True, "initial_scale_power": 20, "hysteresis": 1}}
    )
    sys.path.insert(0, str(REPO / "benchmarks"))
    from run_all import _dataset, _env

    data = _dataset(REPO / "runs" / "bench_cache")
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "ds.json"
        ds.write_text(
            json.dumps(
                {
                    "train_batch_size": 8,
                    "train_micro_batch_size_per_gpu": 8,
                    "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
                    "gradient_clipping": 1.0,
                    **precision,
                }
            )
        )
        log = Path(tmp) / "log.jsonl"
        flags = [
            *(["--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4"]),
            *(["--seq-length", "218", "--max-position-embeddings", "256"]),
            *(["--train-iters", "6" if dry_run else "30"]),
            *(["--log-interval", "1", "--num-workers", "0", "--no-progress-bar"]),
            *(["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model"]),
            str(REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model"),
            *("--data-path", str(data), "--deepspeed_config", str(ds), "--log-json", str(log)),
        ]
        env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29300 + os.getpid() % 500)})
        proc = subprocess.run(
            [sys.executable, str(REPO / "pretrain_glm.py"), *flags],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr[-3000:]}
        records = [json.loads(line) for line in log.read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    scales = [r.get("loss_scale") for r in train]
    skipped = train[-1].get("skipped_steps", 0)
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    finite = all(math.isfinite(x) for x in losses) and len(losses) == len(train)
    ok = finite and (
        dry_run
        or (
            skipped > 0 and scales[-1] is not None and scales[-1] < 2**20 and losses[-1] < losses[0]
        )
    )
    return {"ok": ok, "skipped_steps": skipped, "loss_scales": scales, "losses": losses}


def check_apex(dry_run: bool) -> dict[str, Any]:
    from megatron_glm.kernels import apex_layer_norm_class

    if dry_run or apex_layer_norm_class() is None:
        return {"ok": True, "skipped": "apex is not installed (or no CUDA)"}
    device = _device(dry_run)
    apex_norm = make_layer_norm(512).to(device)
    torch_norm = torch.nn.LayerNorm(512).to(device)
    x = torch.randn(4, 64, 512, device=device)
    diff = (apex_norm(x) - torch_norm(x)).abs().max().item()
    model_norm = GLMModel(_toy_config()).transformer.final_layernorm
    ok = diff < 1e-5 and isinstance(model_norm, apex_layer_norm_class())
    return {"ok": ok, "max_abs_diff": diff, "model_layernorm": type(model_norm).__name__}


def _time_steps(
    model: GLMModel, batch: tuple[torch.Tensor, ...], steps: int, device: torch.device
) -> tuple[float, float]:
    """Seconds per forward + backward step after three warm-up steps, and the last loss."""
    ids, pos, sep, labels, loss_mask = batch

    def step() -> float:
        model.zero_grad(set_to_none=True)
        loss = glm_loss(model(ids, pos, sep), labels, loss_mask, None, loss_mask.sum())
        loss.backward()
        return loss.item()

    for _ in range(3):  # warm-up, compilation included
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, loss


def check_mfu(dry_run: bool) -> dict[str, Any]:
    device = _device(dry_run)
    if dry_run:
        config_kwargs: dict[str, Any] = dict(
            num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=512
        )
        b, s, steps = 2, 64, 2
    else:
        config_kwargs = dict(GLMConfig.from_preset("2b").to_dict())
        b, s, steps = 4, 2048, 10
    results = {}
    for dropout in (0.1, 0.0):
        config_kwargs.update(
            max_sequence_length=s, hidden_dropout=dropout, attention_dropout=dropout
        )
        config = GLMConfig(**config_kwargs)
        # Built on meta and given storage on the device: throughput does not depend on the
        # weights' values, and initialising 1.9B parameters on the host would take longer.
        with torch.device("meta"):
            model = GLMModel(config)
        model = model.to_empty(device=device).to(torch.bfloat16).train()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "layernorm" in name and name.endswith("weight"):
                    param.fill_(1.0)
                elif param.dim() > 1:
                    param.normal_(0.0, 0.02)
                else:
                    param.zero_()
        batch = tuple(t.to(device) for t in _batch(config, b, s))
        seconds, loss = _time_steps(model, batch, steps, device)
        tflops = flops_per_token(config, s) * b * s / seconds / 1e12
        results[f"dropout {dropout}"] = {
            "params_b": config.num_parameters() / 1e9,
            "step_s": seconds,
            "tokens_per_s": b * s / seconds,
            "model_tflops": tflops,
            "mfu": tflops / H200_BF16_PEAK_TFLOPS if device.type == "cuda" else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30
            if device.type == "cuda"
            else None,
            "loss": loss,
        }
        del model
    ok = all(math.isfinite(r["loss"]) for r in results.values())
    return {"ok": ok, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    checks = {
        "flex": check_flex,
        "nccl": check_nccl,
        "fp16": check_fp16,
        "apex": check_apex,
        "mfu": check_mfu,
    }
    parser.add_argument("part", choices=sorted(checks))
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {"part": args.part, **checks[args.part](args.dry_run)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
