"""Choosing the next token: the constraints every strategy applies, then greedy or sampling.

Shape legend: r rows (prompts, or prompts x beams), V the tokenizer's vocabulary.

The constraints (``forbid``) set scores to -inf, on logits or on log-probabilities alike, as the
official ``MinLengthLogitsProcessor`` and ``NoRepeatNGramLogitsProcessor`` do, and look only at the
tokens generated so far for the current blank (its ``history``):

- ``min_tgt_length``: the end tokens are forbidden while the blank is shorter;
- ``no_repeat_ngram_size`` n: a token that would complete an n-gram already in the history is
  forbidden.

Then ``choose_tokens``: temperature 0 is greedy (argmax); otherwise the logits are divided by the
temperature, cut to the ``top_k`` most likely tokens and to the smallest set whose probability
reaches ``top_p`` (the official ``top_k_logits``, batched), and one token is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["banned_ngram_tokens", "choose_tokens", "forbid"]


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of ``history`` if generated next."""
    if n <= 0 or len(history) < n - 1:
        return []
    if n == 1:
        return sorted(set(history))
    prefix = tuple(history[len(history) - n + 1 :])
    return sorted(
        {
            history[i + n - 1]
            for i in range(len(history) - n + 1)
            if tuple(history[i : i + n - 1]) == prefix
        }
    )


def forbid(
    scores: torch.Tensor,
    histories: Sequence[Sequence[int] | None],
    end_ids: Sequence[int],
    min_length: int,
    no_repeat_ngram_size: int,
) -> torch.Tensor:
    """``scores [r, V]`` with the forbidden entries of each row set to -inf (in place). A row
    whose history is None is left alone (not generating this step)."""
    for row, history in enumerate(histories):
        if history is None:
            continue
        if len(history) < min_length:
            scores[row, list(end_ids)] = float("-inf")
        banned = banned_ngram_tokens(history, no_repeat_ngram_size)
        if banned:
            scores[row, banned] = float("-inf")
    return scores


def _top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the tokens outside the smallest set of probability >= ``top_p`` (the most
    likely token always stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    # keep the token that crosses the threshold: shift right by one
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return torch.zeros_like(remove).scatter(-1, order, remove)


def choose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``logits [r, V]`` (fp32, constraints applied) -> token ids ``[r]``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        logits = logits.masked_fill(_top_p_mask(logits, top_p), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
