"""Generation on a small random model: KV cache = recomputation, batched = one by one, one beam =
greedy, beam search = a reference beam search by recomputation, sampling and constraints."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_glm.data.tokenizers import GLMTokenizer
from megatron_glm.inference import Generation, GenerationConfig, generate
from megatron_glm.inference.beam_search import beam_search
from megatron_glm.inference.prompts import encode_prompt, prepare_prompt
from megatron_glm.inference.runner import IncrementalRunner
from megatron_glm.inference.sampling import banned_ngram_tokens
from megatron_glm.model import GLMModel
from tests.inference.conftest import PROMPTS

GREEDY = GenerationConfig(out_seq_length=6, temperature=0.0)


def full_logprobs(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    part_a: list[int],
    segments: list[tuple[int, list[int]]],
) -> torch.Tensor:
    """Log-probabilities of the next token after Part A and the Part B ``segments`` (blank
    position, ``[sop]`` + tokens), recomputed from scratch with a plain forward (no cache)."""
    tokens, positions, blocks = list(part_a), list(range(len(part_a))), [0] * len(part_a)
    for position, segment in segments:
        tokens += segment
        positions += [position] * len(segment)
        blocks += range(1, len(segment) + 1)
    with torch.no_grad():
        logits = model(
            torch.tensor([tokens]), torch.tensor([[positions, blocks]]), torch.tensor([len(part_a)])
        )
    return torch.log_softmax(logits[0, -1, : tokenizer.vocab_size].float(), dim=-1)


def check_against_recomputation(
    model: GLMModel, tokenizer: GLMTokenizer, result: Generation, positions: tuple[int, ...]
) -> int:
    """Every greedy step of ``result`` is the argmax of a full recomputation of the sequence up
    to it, with the same log-probability; returns the number of steps checked."""
    sop, steps = tokenizer.sop_id, 0
    done: list[tuple[int, list[int]]] = []
    for i, (blank, ended, logprobs) in enumerate(
        zip(result.blanks, result.ended, result.token_logprobs)
    ):
        for t in range(len(blank) + ended):
            expected = full_logprobs(
                model, tokenizer, result.prompt_ids, [*done, (positions[i], [sop, *blank[:t]])]
            )
            if t < len(blank):
                assert int(expected.argmax()) == blank[t], (i, t)
                assert math.isclose(float(expected[blank[t]]), logprobs[t], abs_tol=1e-5)
            else:  # the step that ended the blank chose [eop] or [eos]
                assert int(expected.argmax()) in (tokenizer.eop_id, tokenizer.eos_id)
            steps += 1
        done.append((positions[i], [sop, *blank]))
    return steps


def _positions(tokenizer: GLMTokenizer, prompt: str) -> tuple[int, ...]:
    return prepare_prompt(tokenizer, prompt, 128, "test").blank_positions


def test_kv_cache_equals_recomputation_at_every_step(model, tokenizer) -> None:
    results = generate(model, tokenizer, PROMPTS, GREEDY)
    steps = sum(
        check_against_recomputation(model, tokenizer, r, _positions(tokenizer, p))
        for r, p in zip(results, PROMPTS)
    )
    ended = [e for r in results for e in r.ended]
    # both ways a blank stops are exercised: an end token, and the out_seq_length cut
    assert any(ended) and not all(ended), ended
    assert steps >= 30


def test_batched_equals_one_by_one(model, tokenizer) -> None:
    for config in (GREEDY, GenerationConfig(out_seq_length=5, num_beams=3)):
        batched = generate(model, tokenizer, PROMPTS, config)
        for prompt, together in zip(PROMPTS, batched):
            (alone,) = generate(model, tokenizer, [prompt], config)
            assert (together.blanks, together.ended) == (alone.blanks, alone.ended)
            assert together.text == alone.text
            for a, b in zip(together.token_logprobs, alone.token_logprobs):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "constraints",
    [{}, {"min_tgt_length": 3}, {"no_repeat_ngram_size": 2}, {"out_seq_length": 2}],
)
def test_one_beam_equals_greedy(model, tokenizer, constraints) -> None:
    settings = {"out_seq_length": 6, **constraints}
    greedy = generate(model, tokenizer, PROMPTS, GenerationConfig(temperature=0.0, **settings))
    # generate() samples when num_beams is 1, as the official code does: run the beam search
    # itself with one beam
    prompts = [prepare_prompt(tokenizer, p, 128, "test") for p in PROMPTS]
    with torch.no_grad():
        runner = IncrementalRunner(model, tokenizer.vocab_size, prompts)
        beam = beam_search(runner, prompts, tokenizer, GenerationConfig(num_beams=1, **settings))
    assert [g.blanks for g in greedy] == [[b.tokens for b in blanks] for blanks in beam]
    assert [g.ended for g in greedy] == [[b.ended for b in blanks] for blanks in beam]


def reference_beam_search(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    part_a: list[int],
    positions: tuple[int, ...],
    config: GenerationConfig,
) -> list[list[int]]:
    """Beam search written plainly: one beam at a time, every step recomputed from scratch."""
    k, ends, filled = config.num_beams, (tokenizer.eop_id, tokenizer.eos_id), []
    for position in positions:
        done = [(where, [tokenizer.sop_id, *tokens]) for where, tokens in filled]
        beams: list[tuple[float, list[int]]] = [(0.0, [])]
        finished: list[tuple[float, list[int]]] = []
        for step in range(config.out_seq_length):
            candidates = []
            for score, tokens in beams:
                logprobs = full_logprobs(
                    model, tokenizer, part_a, [*done, (position, [tokenizer.sop_id, *tokens])]
                )
                candidates += [(score + float(lp), tokens, t) for t, lp in enumerate(logprobs)]
            candidates.sort(key=lambda c: -c[0])
            beams = []
            for rank, (score, tokens, token) in enumerate(candidates):
                if token in ends:
                    if rank < k:
                        length = max(len(tokens), 1) ** config.length_penalty
                        finished.append((score / length, tokens))
                elif len(beams) < k:
                    beams.append((score, [*tokens, token]))
                if len(beams) == k:
                    break
            finished = sorted(finished, key=lambda f: -f[0])[:k]
            best_open = candidates[0][0] / max(step, 1) ** config.length_penalty
            if len(finished) == k and finished[-1][0] >= best_open:
                break
        else:
            finished += [(s / len(t) ** config.length_penalty, t) for s, t in beams]
        filled.append((position, max(finished, key=lambda f: f[0])[1]))
    return [tokens for _, tokens in filled]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_a_reference_by_recomputation(model, tokenizer, length_penalty) -> None:
    config = GenerationConfig(out_seq_length=4, num_beams=3, length_penalty=length_penalty)
    prompts = PROMPTS[1:3]
    results = generate(model, tokenizer, prompts, config)
    for prompt, result in zip(prompts, results):
        positions = _positions(tokenizer, prompt)
        expected = reference_beam_search(model, tokenizer, result.prompt_ids, positions, config)
        assert result.blanks == expected


def test_sampling(model, tokenizer) -> None:
    sample = GenerationConfig(out_seq_length=6, temperature=1.5, seed=3)
    first, again = (generate(model, tokenizer, PROMPTS, sample) for _ in range(2))
    assert [r.blanks for r in first] == [r.blanks for r in again]
    other = generate(model, tokenizer, PROMPTS, GenerationConfig(out_seq_length=6, seed=4))
    assert [r.blanks for r in other] != [r.blanks for r in first]
    greedy = [r.blanks for r in generate(model, tokenizer, PROMPTS, GREEDY)]
    assert [r.blanks for r in first] != greedy
    for truncation in ({"top_k": 1}, {"top_p": 1e-6}):
        config = GenerationConfig(out_seq_length=6, temperature=1.5, **truncation)
        assert [r.blanks for r in generate(model, tokenizer, PROMPTS, config)] == greedy


def test_constraints(model, tokenizer) -> None:
    free = generate(model, tokenizer, PROMPTS, GenerationConfig(out_seq_length=8, temperature=0))
    short = [len(b) for r in free for b, e in zip(r.blanks, r.ended) if e and len(b) < 3]
    assert short, "no blank ends early without min_tgt_length: the check below would be empty"
    config = GenerationConfig(out_seq_length=8, temperature=0, min_tgt_length=3)
    assert all(len(b) >= 3 for r in generate(model, tokenizer, PROMPTS, config) for b in r.blanks)

    def repeats_a_bigram(blank: list[int]) -> bool:
        bigrams = list(zip(blank, blank[1:]))
        return len(set(bigrams)) < len(bigrams)

    assert any(repeats_a_bigram(b) for r in free for b in r.blanks)
    for num_beams in (1, 2):
        config = GenerationConfig(
            out_seq_length=8, temperature=0, no_repeat_ngram_size=2, num_beams=num_beams
        )
        results = generate(model, tokenizer, PROMPTS, config)
        assert not any(repeats_a_bigram(b) for r in results for b in r.blanks)


def test_banned_ngram_tokens() -> None:
    assert banned_ngram_tokens([5, 6, 5, 7, 5], 2) == [6, 7]
    assert banned_ngram_tokens([5, 6, 5], 3) == []
    assert banned_ngram_tokens([5, 6, 5, 6], 3) == [5]
    assert banned_ngram_tokens([4, 4, 9], 1) == [4, 9]


def test_prompts_and_results(model, tokenizer) -> None:
    assert encode_prompt(tokenizer, "a b  [MASK] c") == encode_prompt(tokenizer, "a b[MASK] c")
    ids = encode_prompt(tokenizer, "Modules can")
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.gmask_id  # no [eos] after it
    (by_text, by_ids) = generate(model, tokenizer, ["Modules can", ids], GREEDY)
    assert by_text.blanks == by_ids.blanks and by_text.prompt_ids == ids
    assert by_text.filled_ids == ids[1:-1] + by_text.blanks[0]  # no [CLS] framing in the text
    assert by_ids.filled_ids == ids[:-1] + by_ids.blanks[0]  # ids prompts are kept whole
    assert by_text.text == tokenizer.decode(by_text.filled_ids)
    assert by_text.blank_texts == [tokenizer.decode(by_text.blanks[0])]
    assert generate(model, tokenizer, [], GREEDY) == []
    assert model.training is False
    model.train()
    generate(model, tokenizer, PROMPTS[:1], GREEDY)
    assert model.training is True  # restored
    model.eval()


def test_bad_input(model, tokenizer) -> None:
    with pytest.raises(ValueError, match=r"prompt 1: no \[MASK\], \[sMASK\] or \[gMASK\]"):
        generate(model, tokenizer, ["ok[MASK]", [3, 300, 2]], GREEDY)
    with pytest.raises(ValueError, match="prompt 0: the prompt has 200 tokens; the model takes"):
        generate(model, tokenizer, [[4] * 200], GREEDY)
    with pytest.raises(ValueError, match="out_seq_length 128 must be below"):
        generate(model, tokenizer, PROMPTS, GenerationConfig(out_seq_length=128))
    with pytest.raises(ValueError, match=r"prompt 0: ids \[5000\] outside"):
        generate(model, tokenizer, [[4, 5000]], GREEDY)
    with pytest.raises(ValueError, match="top_p must be in .* min_tgt_length must be in"):
        GenerationConfig(out_seq_length=2, top_p=2.0, min_tgt_length=3)
