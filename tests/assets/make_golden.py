"""Generate ``tests/assets/golden_tiny.json``: the tiny preset's losses and gradient norms over a few
training steps on one fixed batch, the reference ``tests/model/test_golden.py`` compares against.

Regenerate it (from the repository root, in the project's virtual environment) only when a change
is *meant* to change the model's numerics, or after moving to a new pinned torch::

    python tests/assets/make_golden.py

and say in the commit why the numbers moved. The run: ``GLMConfig.from_preset("tiny")`` with
dropout 0 (the file pins the model's arithmetic, not torch's random streams, which a torch upgrade
may redraw; the dropout RNG streams are checked bit for bit by tests/distributed/test_resume.py),
the default ``attention_backend="auto"`` (SDPA on CPU), fp32 on one CPU thread; a batch of two
samples with a real Part A / Part B layout drawn from a fixed numpy seed (one with two masked
spans, one with a single span and padding after Part B); ``STEPS`` plain SGD updates
``p -= LR * grad`` written out here (no torch optimizer, so only the model's math is pinned). Each
step records the loss (``glm_loss`` normalised by the batch's loss tokens) and the global L2 norm
of the gradients; one more forward records the loss after the last update, and the sum of squares
of all final weights (float64) fingerprints the whole trajectory. Floats are stored as
``float.hex`` so they round-trip exactly; ``torch`` and ``cpu_kernels`` record the torch version
and the CPU kernels they were made with (torch's capability, AVX512 or AVX2, plus the instruction
sets oneDNN dispatches on: on torch 2.13 an AVX512 Intel CPU with AMX and an AVX512 AMD CPU give
parameter fingerprints 3e-12 apart); the last bits depend on both, and on the thread count, which is
why the run uses one thread like the test suite.

Shape legend: b batch, s sequence, v vocab.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_glm import GLMConfig, GLMModel
from megatron_glm.model import glm_loss

GOLDEN_PATH = Path(__file__).with_name("golden_tiny.json")
CONFIG_OVERRIDES: dict[str, Any] = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
BATCH_SEED = 20240611
SEQ_LENGTH = 32
SPANS_PER_SAMPLE = (2, 1)  # sample 1 is short: its tail is padding
STEPS = 3
LR = 0.1
# Token ids: text from [1, 1000), the GLM command tokens at the top of the 1024-id vocabulary.
PAD, MASK, SOP, EOP = 0, 1021, 1022, 1023


def _sample(rng: np.random.Generator, num_spans: int) -> dict[str, list[int] | int]:
    """One blank-infilling sample: Part A is the text with each span replaced by one [MASK]
    (bidirectional); Part B holds the spans in shuffled order, each as ``[sop] + span`` -> ``span +
    [eop]`` with its [MASK]'s absolute position and block positions 1..
    (docs/blank-infilling.md#part-a--part-b-layout)."""
    gaps = rng.integers(2, 6, size=num_spans + 1)
    lengths = rng.integers(1, 5, size=num_spans)
    part_a: list[int] = []
    spans: list[tuple[int, list[int]]] = []  # ([MASK] position in Part A, span tokens)
    for i, gap in enumerate(gaps):
        part_a += rng.integers(1, 1000, size=int(gap)).tolist()
        if i < num_spans:
            spans.append((len(part_a), rng.integers(1, 1000, size=int(lengths[i])).tolist()))
            part_a.append(MASK)
    sep = len(part_a)
    tokens, labels = list(part_a), list(part_a)
    loss_mask = [0] * sep
    positions, blocks = list(range(sep)), [0] * sep
    for j in rng.permutation(num_spans):
        mask_at, span = spans[j]
        tokens += [SOP, *span]
        labels += [*span, EOP]
        loss_mask += [1] * (len(span) + 1)
        positions += [mask_at] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
    pad = SEQ_LENGTH - len(tokens)
    assert pad >= 0, "sample longer than SEQ_LENGTH"
    return {
        "tokens": tokens + [PAD] * pad,
        "labels": labels + [PAD] * pad,
        "loss_mask": loss_mask + [0] * pad,
        "position_ids": positions + [0] * pad,
        "block_position_ids": blocks + [0] * pad,
        "sep": sep,
    }


def golden_batch() -> dict[str, list[Any]]:
    """The fixed batch as plain lists (what the JSON stores), a pure function of ``BATCH_SEED``."""
    rng = np.random.default_rng(BATCH_SEED)
    samples = [_sample(rng, k) for k in SPANS_PER_SAMPLE]
    return {key: [s[key] for s in samples] for key in samples[0]}


def _tensors(batch: dict[str, list[Any]]) -> tuple[torch.Tensor, ...]:
    input_ids = torch.tensor(batch["tokens"])  # [b, s]
    position_ids = torch.stack(
        [torch.tensor(batch["position_ids"]), torch.tensor(batch["block_position_ids"])], dim=1
    )  # [b, 2, s]
    sep = torch.tensor(batch["sep"])  # [b]
    labels = torch.tensor(batch["labels"])  # [b, s]
    loss_mask = torch.tensor(batch["loss_mask"], dtype=torch.float32)  # [b, s]
    return input_ids, position_ids, sep, labels, loss_mask


def golden_run(batch: dict[str, list[Any]]) -> dict[str, Any]:
    """Losses (``STEPS + 1``), gradient norms (``STEPS``) and the final parameter fingerprint of the
    tiny model trained on ``batch``."""
    input_ids, position_ids, sep, labels, loss_mask = _tensors(batch)
    model = GLMModel(GLMConfig.from_preset("tiny", **CONFIG_OVERRIDES))
    model.train()
    params = list(model.parameters())
    losses: list[float] = []
    grad_norms: list[float] = []
    for step in range(STEPS + 1):
        for p in params:
            p.grad = None
        logits = model(input_ids, position_ids, sep)  # [b, s, v]
        loss = glm_loss(logits, labels, loss_mask, None, normalizer=loss_mask.sum())
        losses.append(loss.item())
        if step == STEPS:
            break
        loss.backward()
        norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        grad_norms.append(torch.linalg.vector_norm(norms).item())
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-LR)
    # sum of squares of every final weight in float64: moves when any single bit of the trajectory
    # does, even where the fp32 losses round the difference away
    fingerprint = sum(p.detach().double().square().sum().item() for p in params)
    return {"losses": losses, "grad_norms": grad_norms, "param_fingerprint": fingerprint}


def _json_lines(value: Any, indent: str = "") -> str:
    """JSON with one line per key (a batch row stays on one line), so diffs stay readable."""
    if not isinstance(value, dict):
        return json.dumps(value)
    inner = indent + "  "
    items = [f"{inner}{json.dumps(k)}: {_json_lines(v, inner)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


# CPU features that change which matrix-multiplication kernels oneDNN picks at equal capability.
_KERNEL_FLAGS = ("amx_tile", "amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512_vnni")


def cpu_kernels() -> str:
    """``AVX512+amx_bf16+amx_tile+...``: torch's CPU capability and the kernel-relevant flags of
    /proc/cpuinfo (empty where there is none)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    present = sorted(flag for flag in _KERNEL_FLAGS if flag in flags)
    return "+".join([torch.backends.cpu.get_cpu_capability(), *present])


def main() -> None:
    torch.set_num_threads(1)  # as in the test suite (tests/conftest.py)
    batch = golden_batch()
    result = golden_run(batch)
    golden = {
        "about": "tests/assets/make_golden.py writes this; tests/model/test_golden.py checks it",
        "torch": torch.__version__.split("+")[0],
        "cpu_kernels": cpu_kernels(),
        "config": {"preset": "tiny", **CONFIG_OVERRIDES},
        "steps": STEPS,
        "lr": LR,
        "losses_hex": [v.hex() for v in result["losses"]],
        "grad_norms_hex": [v.hex() for v in result["grad_norms"]],
        "param_fingerprint_hex": result["param_fingerprint"].hex(),
        "losses": result["losses"],
        "grad_norms": result["grad_norms"],
        "param_fingerprint": result["param_fingerprint"],
        "batch": batch,
    }
    GOLDEN_PATH.write_text(_json_lines(golden) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN_PATH}: losses {result['losses']}, grad norms {result['grad_norms']}")


if __name__ == "__main__":
    main()
