"""Blank-infilling generation with a KV cache (docs/generation.md).

Shape legend: r rows (prompts, or prompts x beams), s tokens run in one forward, V the
tokenizer's vocabulary (the model's padded rows are never produced).

How a batch runs: every prompt's Part A is run once, right-padded to the longest (``sep`` is each
row's own length, so Part A stays bidirectional and never sees the padding), together with the
``[sop]`` of its first blank. From then on each forward appends one token per row to the cache:
the token just chosen, at the blank's position with block position 2, 3, ..., or after an end
token the next blank's ``[sop]`` (block position 1), or padding once a row has filled all its
blanks. Padding is hidden from every query by the cache's key mask, so a row computes exactly
what it computes alone. Beam search (``beam_search.py``) runs on the same machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_glm.data.tokenizers import GLMTokenizer
from megatron_glm.inference.beam_search import beam_search
from megatron_glm.inference.config import GenerationConfig
from megatron_glm.inference.prompts import Prompt, prepare_prompt
from megatron_glm.inference.runner import BlankResult, IncrementalRunner, end_token_ids
from megatron_glm.inference.sampling import choose_tokens, forbid
from megatron_glm.model import GLMModel

__all__ = ["Generation", "generate"]


@dataclass
class Generation:
    """What one prompt became.

    ``blanks[i]``: the ids generated for blank i (left to right), without ``[sop]`` and the end
    token; ``ended[i]``: it stopped on ``[eop]``/``[eos]`` (False: it reached
    ``out_seq_length``); ``token_logprobs[i]``: each generated token's log-probability under the
    model (log-softmax of its logits, before temperature and truncation); ``filled_ids`` /
    ``text``: the prompt with every blank replaced (text prompts without the ``[CLS]``/``[eos]``
    framing); ``blank_texts``: each blank decoded alone.
    """

    prompt_ids: list[int]
    blanks: list[list[int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    token_logprobs: list[list[float]] = field(default_factory=list)
    filled_ids: list[int] = field(default_factory=list)
    text: str = ""
    blank_texts: list[str] = field(default_factory=list)


def _sample(
    runner: IncrementalRunner,
    prompts: Sequence[Prompt],
    tokenizer: GLMTokenizer,
    config: GenerationConfig,
) -> list[list[BlankResult]]:
    """Greedy or sampled filling, every row at its own pace (one token per row per forward)."""
    end_ids = end_token_ids(tokenizer)
    generator = torch.Generator(device=runner.device).manual_seed(config.seed)
    results: list[list[BlankResult]] = [[] for _ in prompts]
    current = [BlankResult([], [], False) for _ in prompts]
    # per row: "sample" (this forward's logits choose its next token), "sop" (the last token of
    # a blank cut at out_seq_length went in; the next blank's [sop] comes next) or "done"
    state = ["sample"] * len(prompts)
    logits = runner.start(prompts, tokenizer.pad_id, tokenizer.sop_id)
    while True:
        histories = [c.tokens if s == "sample" else None for c, s in zip(current, state)]
        scores = forbid(
            logits.clone(), histories, end_ids, config.min_tgt_length, config.no_repeat_ngram_size
        )
        picked = choose_tokens(scores, config.temperature, config.top_k, config.top_p, generator)
        chosen = picked.tolist()
        chosen_logprobs = torch.log_softmax(logits, dim=-1).gather(1, picked[:, None]).tolist()
        inputs: list[tuple[int, int, int, bool]] = []  # per row: token, position, block, valid
        for row, prompt in enumerate(prompts):
            if state[row] == "done":
                inputs.append((tokenizer.pad_id, 0, 0, False))
                continue
            position = prompt.blank_positions[len(results[row])]
            if state[row] == "sop":
                state[row] = "sample"
                inputs.append((tokenizer.sop_id, position, 1, True))
                continue
            blank, token = current[row], chosen[row]
            if token in end_ids:
                blank.ended = True
            else:
                blank.tokens.append(token)
                blank.logprobs.append(chosen_logprobs[row][0])
            # the token goes in at its blank's position, block position 2, 3, ...
            fed = (token, position, len(blank.tokens) + 1, True)
            if not blank.ended and len(blank.tokens) < config.out_seq_length:
                inputs.append(fed)
                continue
            results[row].append(blank)
            current[row] = BlankResult([], [], False)
            if len(results[row]) == len(prompt.blank_positions):
                state[row] = "done"
                inputs.append((tokenizer.pad_id, 0, 0, False))
            elif blank.ended:  # its last token went in with the forward that chose [eop]
                inputs.append(
                    (tokenizer.sop_id, prompt.blank_positions[len(results[row])], 1, True)
                )
            else:  # cut at out_seq_length: the later blanks see its last token too
                state[row] = "sop"
                inputs.append(fed)
        if all(s == "done" for s in state):
            return results
        logits = runner.run(*([[item[i]] for item in inputs] for i in range(4)))


def generate(
    model: GLMModel,
    tokenizer: GLMTokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig,
    *,
    append_blank: str = "[gMASK]",
) -> list[Generation]:
    """Fill every blank of every prompt, left to right; one ``Generation`` per prompt, in order.

    ``model``: a ``GLMModel`` at any TP degree (every rank of its TP group calls this with the
    same arguments and gets the same result). ``tokenizer``: the model's. ``prompts``: text with
    ``[MASK]``/``[sMASK]``/``[gMASK]`` blanks (framed as ``[CLS] text [eos]``; a text without a
    blank gets ``append_blank`` at its end) or lists of ids, each a complete Part A with at least
    one blank. Prompts of different lengths run as one padded batch; each gives what it gives
    alone. Each blank's Part B is ``[sop]`` + its tokens at the blank's position with block
    positions 1, 2, ...; it sees Part A and the blanks before it, and stops on ``[eop]`` or
    ``[eos]`` or after ``config.out_seq_length`` tokens. Runs under ``torch.no_grad`` in eval mode
    (the model's mode is restored).
    """
    mcfg = model.config
    if tokenizer.vocab_size > mcfg.padded_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model's table only "
            f"{mcfg.padded_vocab_size}: not the model's tokenizer"
        )
    if config.out_seq_length >= mcfg.max_sequence_length:
        raise ValueError(
            f"out_seq_length {config.out_seq_length} must be below the model's "
            f"max_sequence_length {mcfg.max_sequence_length} (block positions go up to "
            "out_seq_length + 1)"
        )
    if not prompts:
        return []
    prepared = [
        prepare_prompt(tokenizer, p, mcfg.max_sequence_length, f"prompt {i}", append_blank)
        for i, p in enumerate(prompts)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            runner = IncrementalRunner(model, tokenizer.vocab_size, prepared)
            if config.num_beams > 1:
                filled = beam_search(runner, prepared, tokenizer, config)
            else:
                filled = _sample(runner, prepared, tokenizer, config)
    finally:
        model.train(was_training)
    out = []
    for prompt, blanks in zip(prepared, filled):
        ids = prompt.fill([b.tokens for b in blanks])
        out.append(
            Generation(
                prompt_ids=list(prompt.ids),
                blanks=[b.tokens for b in blanks],
                ended=[b.ended for b in blanks],
                token_logprobs=[b.logprobs for b in blanks],
                filled_ids=ids,
                text=tokenizer.decode(ids),
                blank_texts=[tokenizer.decode(b.tokens) for b in blanks],
            )
        )
    return out
