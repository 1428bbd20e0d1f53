"""The model run incrementally over a batch of rows with a KV cache (docs/generation.md).

Shape legend: r rows (prompts, or prompts x beams), s tokens run in one forward, V the
tokenizer's vocabulary (the model's padded rows are never produced).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_glm.data.tokenizers import GLMTokenizer
from megatron_glm.inference.kv_cache import KVCache
from megatron_glm.inference.prompts import Prompt
from megatron_glm.model import GLMModel
from megatron_glm.parallel import gather_from_tensor_model_parallel_region

__all__ = ["BlankResult", "IncrementalRunner", "end_token_ids"]


@dataclass
class BlankResult:
    """One filled blank: tokens, their log-probabilities, whether an end token stopped it."""

    tokens: list[int]
    logprobs: list[float]
    ended: bool


class IncrementalRunner:
    """Runs ``model`` over a growing batch of sequences with a KV cache; every forward returns
    the full-vocabulary fp32 logits of each row's last token (gathered over TP)."""

    def __init__(self, model: GLMModel, vocab_size: int, prompts: Sequence[Prompt]) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.sep = torch.tensor([len(p.ids) for p in prompts], device=self.device)
        self.part_a_length = max(len(p.ids) for p in prompts)
        self.cache = KVCache(model.config.num_layers, self.part_a_length + 64)

    def run(
        self,
        tokens: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        block_positions: Sequence[Sequence[int]],
        valid: Sequence[Sequence[bool]],
    ) -> torch.Tensor:
        """Append ``s`` tokens per row (lists ``[r][s]``) -> logits ``[r, V]`` after the last."""

        def tensor(rows: Sequence[Sequence[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(rows, dtype=dtype, device=self.device)

        input_ids = tensor(tokens, torch.long)  # [r, s]
        position_ids = torch.stack(
            [tensor(positions, torch.long), tensor(block_positions, torch.long)], dim=1
        )  # [r, 2, s]
        key_mask = self.cache.mask_with(tensor(valid, torch.bool))  # [r, cached + s]
        logits = self.model(input_ids, position_ids, self.sep, self.cache, key_mask)
        last = gather_from_tensor_model_parallel_region(logits[:, -1], self.model.tp_group)
        return last[:, : self.vocab_size].float()  # [r, V]

    def start(self, prompts: Sequence[Prompt], pad_id: int, sop_id: int) -> torch.Tensor:
        """Run every Part A (right-padded) and the ``[sop]`` of its first blank."""
        width = self.part_a_length
        tokens, positions, blocks, valid = [], [], [], []
        for p in prompts:
            pad = width - len(p.ids)
            tokens.append([*p.ids, *[pad_id] * pad, sop_id])
            positions.append([*range(width), p.blank_positions[0]])
            blocks.append([0] * width + [1])
            valid.append([True] * len(p.ids) + [False] * pad + [True])
        return self.run(tokens, positions, blocks, valid)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search's reordering and expansion)."""
        self.cache.select_rows(index)
        self.sep = self.sep.index_select(0, index)


def end_token_ids(tokenizer: GLMTokenizer) -> list[int]:
    """The tokens that end a blank: ``[eop]``, and ``[eos]`` as in the official code."""
    return sorted({tokenizer.eop_id, tokenizer.eos_id})
