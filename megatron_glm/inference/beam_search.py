"""Beam search over the blanks of a batch of prompts (docs/generation.md#beam-search).

Shape legend: b prompts, k beams, V vocabulary; the runner's rows are prompt-major (row g*k + j is
beam j of prompt g).

Each blank is searched on its own, as the official code does: the k beams of a prompt start from
one ``[sop]``; every step each beam's log-probabilities (the constraints of ``sampling.forbid``
applied) are added to its score and the best candidates over all k x V continuations are taken in
order: an end token among the first k finishes a hypothesis (scored ``sum of log-probabilities /
length ** length_penalty``, length without the end token), other tokens fill the k beams of the
next step. A prompt's search stops when it holds k finished hypotheses and none of the running
beams can still beat the worst of them (the length-normalised best candidate score does not
exceed it, the rule of the official ``BeamSearchScorer``), or when its beams reach
``out_seq_length`` tokens (they are then scored as they are). The best finished hypothesis fills
the blank. With one beam this is greedy decoding.

Blanks are filled one after another for the whole batch: when every prompt has finished blank i
the cache is cut back to where that blank's ``[sop]`` stood, and one forward runs each prompt's
winner (``[sop]`` + tokens, padded to the longest) followed by the ``[sop]`` of blank i + 1, on all
k rows of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_glm.data.tokenizers import GLMTokenizer
from megatron_glm.inference.config import GenerationConfig
from megatron_glm.inference.prompts import Prompt
from megatron_glm.inference.runner import BlankResult, IncrementalRunner, end_token_ids
from megatron_glm.inference.sampling import forbid

__all__ = ["beam_search"]

Row = tuple[int, int, int, bool]  # one input token: id, position, block position, valid


class _Hypotheses:
    """The k best finished hypotheses of one prompt's blank."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.best: list[tuple[float, BlankResult]] = []

    def score(self, total: float, length: int) -> float:
        return total / max(length, 1) ** self.length_penalty

    def add(self, result: BlankResult, total: float) -> None:
        self.best.append((self.score(total, len(result.tokens)), result))
        self.best.sort(key=lambda item: item[0], reverse=True)
        del self.best[self.num_beams :]

    def cannot_improve(self, best_candidate: float, length: int) -> bool:
        return len(self.best) == self.num_beams and self.best[-1][0] >= self.score(
            best_candidate, length
        )


def _search_blank(
    runner: IncrementalRunner,
    logits: torch.Tensor,
    prompts: Sequence[Prompt],
    blank: int,
    tokenizer: GLMTokenizer,
    config: GenerationConfig,
) -> list[BlankResult | None]:
    """Beam search blank ``blank`` of every prompt that has it; ``logits [b*k, V]`` are those
    after its ``[sop]``. Returns each prompt's best hypothesis (None without that blank)."""
    k, vocab = config.num_beams, logits.shape[-1]
    end_ids = end_token_ids(tokenizer)
    done = [len(p.blank_positions) <= blank for p in prompts]
    beams = [[BlankResult([], [], False) for _ in range(k)] for _ in prompts]
    hypotheses = [_Hypotheses(k, config.length_penalty) for _ in prompts]
    # all k beams of a prompt are the same [sop]: only the first may expand at the first step
    beam_scores = torch.full((len(prompts), k), float("-inf"), device=logits.device)
    beam_scores[:, 0] = 0.0
    step = 0
    while True:
        logprobs = torch.log_softmax(logits, dim=-1)  # [b*k, V]
        histories = [None if done[g] else b.tokens for g in range(len(prompts)) for b in beams[g]]
        scores = forbid(
            logprobs.clone(), histories, end_ids, config.min_tgt_length, config.no_repeat_ngram_size
        )
        total = (scores + beam_scores.view(-1, 1)).view(len(prompts), k * vocab)
        # enough candidates that k of them are not end tokens
        top_scores, top_index = total.topk(min(k * (1 + len(end_ids)), k * vocab), dim=1)
        rows = top_index // vocab + torch.arange(len(prompts), device=logits.device)[:, None] * k
        top_logprobs = logprobs[rows, top_index % vocab].tolist()
        keep = list(range(len(prompts) * k))  # the rows the next step continues
        inputs: list[Row] = [(tokenizer.pad_id, 0, 0, False)] * (len(prompts) * k)
        for g, prompt in enumerate(prompts):
            if done[g]:
                continue
            chosen: list[tuple[int, BlankResult, float]] = []
            for rank, (score, flat, logprob) in enumerate(
                zip(top_scores[g].tolist(), top_index[g].tolist(), top_logprobs[g])
            ):
                source, token = divmod(flat, vocab)
                parent = beams[g][source]
                if token in end_ids:
                    if rank < k:
                        hypotheses[g].add(BlankResult(parent.tokens, parent.logprobs, True), score)
                    continue
                child = BlankResult([*parent.tokens, token], [*parent.logprobs, logprob], False)
                chosen.append((source, child, score))
                if len(chosen) == k:
                    break
            if hypotheses[g].cannot_improve(float(top_scores[g, 0]), step):
                done[g] = True
                continue
            if step + 1 == config.out_seq_length:
                for _, child, score in chosen:
                    hypotheses[g].add(child, score)
                done[g] = True
                continue
            for j, (source, child, score) in enumerate(chosen):
                keep[g * k + j] = g * k + source
                beams[g][j] = child
                beam_scores[g, j] = score
                position = prompt.blank_positions[blank]
                inputs[g * k + j] = (child.tokens[-1], position, len(child.tokens) + 1, True)
        if all(done):
            return [h.best[0][1] if h.best else None for h in hypotheses]
        runner.select_rows(torch.tensor(keep, device=logits.device))
        logits = runner.run(*([[row[i]] for row in inputs] for i in range(4)))
        step += 1


def _replay_winners(
    prompts: Sequence[Prompt],
    winners: Sequence[BlankResult | None],
    blank: int,
    num_beams: int,
    tokenizer: GLMTokenizer,
) -> list[list[Row]]:
    """Per row: blank ``blank``'s winner (``[sop]`` + tokens, right-padded) and the next blank's
    ``[sop]``; padding for prompts without a next blank."""
    width = 1 + max(len(w.tokens) for w in winners if w is not None)
    pad: Row = (tokenizer.pad_id, 0, 0, False)
    rows = []
    for prompt, winner in zip(prompts, winners):
        if winner is None or len(prompt.blank_positions) <= blank + 1:
            row = [pad] * (width + 1)
        else:
            position = prompt.blank_positions[blank]
            ids = [tokenizer.sop_id, *winner.tokens]
            row = [(token, position, i + 1, True) for i, token in enumerate(ids)]
            row += [pad] * (width - len(ids))
            row.append((tokenizer.sop_id, prompt.blank_positions[blank + 1], 1, True))
        rows += [row] * num_beams
    return rows


def beam_search(
    runner: IncrementalRunner,
    prompts: Sequence[Prompt],
    tokenizer: GLMTokenizer,
    config: GenerationConfig,
) -> list[list[BlankResult]]:
    """Every blank of every prompt by beam search; the filled blanks per prompt, in order."""
    k = config.num_beams
    logits = runner.start(prompts, tokenizer.pad_id, tokenizer.sop_id)  # [b, V]
    expand = torch.arange(len(prompts), device=logits.device).repeat_interleave(k)
    runner.select_rows(expand)
    logits = logits.index_select(0, expand)  # [b*k, V]
    sop_at = runner.part_a_length  # where the current blank's [sop] sits in the cache
    results: list[list[BlankResult]] = [[] for _ in prompts]
    num_blanks = max(len(p.blank_positions) for p in prompts)
    for blank in range(num_blanks):
        winners = _search_blank(runner, logits, prompts, blank, tokenizer, config)
        for result, winner in zip(results, winners):
            if winner is not None:
                result.append(winner)
        if blank + 1 == num_blanks:
            break
        runner.cache.truncate(sop_at)
        rows = _replay_winners(prompts, winners, blank, k, tokenizer)
        sop_at += len(rows[0]) - 1
        logits = runner.run(*([[item[i] for item in row] for row in rows] for i in range(4)))
    return results
