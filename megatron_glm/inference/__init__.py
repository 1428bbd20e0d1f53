"""Blank-infilling generation with a KV cache (docs/generation.md).

API (stable; ``tools/generate.py`` and the seq2seq evaluation use it)::

    from megatron_glm.inference import GenerationConfig, generate

    results = generate(model, tokenizer, prompts, GenerationConfig(...), append_blank="[gMASK]")

- ``model``: a ``GLMModel`` at any TP degree (under TP every rank of the group calls ``generate``
  with the same arguments; all get the same result). Any dtype/device; run in eval mode under
  ``torch.no_grad`` (the model's mode is restored).
- ``tokenizer``: the model's ``GLMTokenizer`` (``megatron_glm.data.tokenizers``).
- ``prompts``: a list; each item is either text with ``[MASK]``/``[sMASK]``/``[gMASK]`` blanks
  (run as ``[CLS] text [eos]``, no ``[eos]`` after a final ``[gMASK]``; a text without a blank
  gets ``append_blank`` at its end; whitespace before a blank is dropped), or a list of ids taken as the complete Part A
  (``[CLS]`` etc. included by the caller) with at least one blank. Prompts of different lengths
  are batched with padding; each gives exactly what it gives alone.
- ``GenerationConfig``: ``out_seq_length`` (max tokens per blank), ``temperature`` (0: greedy),
  ``top_k``, ``top_p``, ``num_beams`` (> 1: beam search), ``length_penalty``,
  ``no_repeat_ngram_size``, ``min_tgt_length``, ``seed`` (sampling).
- Returns one ``Generation`` per prompt, in order: ``blanks`` (generated ids per blank, left to
  right, without ``[sop]``/``[eop]``), ``blank_texts``, ``ended`` (per blank: stopped on
  ``[eop]``/``[eos]`` rather than at ``out_seq_length``), ``token_logprobs``, ``filled_ids`` and
  ``text`` (the prompt with its blanks filled, without the ``[CLS]``/``[eos]`` framing),
  ``prompt_ids`` (the Part A that ran).

Blanks are filled left to right: blank i's Part B (``[sop]`` + tokens at the blank's position,
block positions 1, 2, ...) sees Part A and blanks 0..i-1, and stops on ``[eop]``/``[eos]``.
Batch size is the caller's: ``generate`` runs all given prompts as one batch.
``megatron_glm.inference.loading.load_model_for_generation`` builds a model (any TP) from a
checkpoint of any form.
"""

from megatron_glm.inference.config import GenerationConfig
from megatron_glm.inference.generation import Generation, generate
from megatron_glm.inference.kv_cache import KVCache, LayerKVCache

__all__ = ["Generation", "GenerationConfig", "KVCache", "LayerKVCache", "generate"]
