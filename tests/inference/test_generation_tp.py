"""Generation with the model split over two tensor-parallel ranks equals TP = 1."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_glm.data.tokenizers import build_tokenizer
from megatron_glm.inference import GenerationConfig, generate
from tests.distributed.harness import run_distributed
from tests.inference.conftest import PROMPTS, TOKENIZER_MODEL, random_model

CONFIGS = [
    GenerationConfig(out_seq_length=6, temperature=0.0),
    GenerationConfig(out_seq_length=4, num_beams=3),
    GenerationConfig(out_seq_length=6, temperature=1.5, top_k=20, seed=5),
]


def _generate(rank: int, world_size: int) -> list[list[tuple[list[list[int]], list[float]]]]:
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(TOKENIZER_MODEL))
    model = random_model(tokenizer, dist.group.WORLD if world_size > 1 else None)
    out = []
    for config in CONFIGS:
        results = generate(model, tokenizer, PROMPTS, config)
        out.append(
            [(r.blanks, [lp for blank in r.token_logprobs for lp in blank]) for r in results]
        )
    return out


def test_tp2_equals_tp1(tokenizer) -> None:
    torch.set_num_threads(1)
    expected = _generate(0, 1)
    ranks = run_distributed(_generate, 2, timeout=180)
    for got in ranks:  # both ranks hold the whole result
        for config_got, config_expected in zip(got, expected):
            for (blanks, logprobs), (blanks_1, logprobs_1) in zip(config_got, config_expected):
                assert blanks == blanks_1
                torch.testing.assert_close(logprobs, logprobs_1, rtol=0, atol=1e-5)
