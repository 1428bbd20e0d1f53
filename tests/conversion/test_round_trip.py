"""Issue 8's round trip in one chain, through every form and layout the converter writes:
ours (TP 2 x PP 2, a real training run) -> consolidated -> ours (TP 1) -> official (TP 2) ->
ours (TP 4) -> hf -> consolidated gives identical tensors, and every form gives the same logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_glm.conversion import get_form, read_checkpoint
from megatron_glm.conversion.canonical import CanonicalCheckpoint
from megatron_glm.model import GLMModel
from tests.conversion import TrainedCheckpoints

CHAIN = [
    ("consolidated", 1),
    ("deepspeed", 1),
    ("official", 2),
    ("deepspeed", 4),
    ("hf", 1),
    ("consolidated", 1),
]


def _logits(checkpoint: CanonicalCheckpoint) -> torch.Tensor:
    model = GLMModel(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state, strict=True)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, checkpoint.config.vocab_size, (2, 24), generator=generator)
    sep = torch.tensor([10, 16])
    positions = torch.stack(
        [
            torch.arange(24).clamp(max=15).expand(2, 24),
            (torch.arange(24) >= 16).long().expand(2, 24),
        ],
        dim=1,
    )  # [b, 2, s]: Part A 0..15, then a Part B span at position 15 with block positions 1
    with torch.no_grad():
        return model(tokens, positions, sep)


def test_every_form_round_trips_bitwise_with_the_same_logits(
    sources: TrainedCheckpoints, trained: CanonicalCheckpoint, tmp_path: Path
) -> None:
    reference = _logits(trained)
    current, path = trained, sources.tp2_pp2
    for step, (form, tp) in enumerate(CHAIN):
        out = tmp_path / f"{step}-{form}-tp{tp}"
        get_form(form).write(current, out, tensor_parallel=tp)
        current = read_checkpoint(out, trained.config)
        assert list(current.state) == list(trained.state), (form, tp)
        for name, tensor in trained.state.items():
            assert torch.equal(current.state[name], tensor), (form, tp, name)
        # the same model, so the same logits (fp32, identical weights: exactly equal)
        logits = _logits(current)
        assert torch.allclose(logits, reference, rtol=1e-5, atol=1e-6), (form, tp)
        path = out
    assert path.name.endswith("consolidated-tp1")
    model = GLMModel.from_pretrained(path)
    assert torch.equal(
        model.state_dict()["word_embeddings.weight"], trained.state["word_embeddings.weight"]
    )
