"""Seq2seq evaluation by generation: fill each validation source's blank with the finetuned model
(``megatron_glm.inference.generate``) and score the texts with ROUGE-1/2/L (``rouge-score``).

The validation examples are shared out over the data-parallel ranks; every rank of a TP group
generates the same prompts together. Scores are the mean F-measures over examples, in [0, 1],
with ``rouge-score``'s tokenizer and its Porter stemmer (the summarisation papers' setting).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

logger = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures of ``predictions`` against ``references``."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise ImportError(
            "seq2seq evaluation needs the rouge-score package: pip install 'megatron_glm[finetune]'"
        ) from err
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def generate_targets(
    model: Any, tokenizer: Any, examples: Sequence[Any], config: Any, batch_size: int
) -> list[str]:
    """The text generated into the blank of each example's Part A, in order."""
    from megatron_glm.inference import generate

    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        results = generate(model, tokenizer, [list(e.part_a) for e in batch], config)
        texts += [result.blank_texts[0] for result in results]
    return texts


def rouge_by_generation(task: Any, trainer: Any, groups: Any) -> dict[str, float]:
    """ROUGE of the model in ``trainer`` on ``task``'s validation split (every rank calls it and
    gets the scores); with pipeline parallelism there is no whole model to generate with, so
    nothing is scored (logged)."""
    if groups.pp_size > 1:
        if groups.rank == 0:
            logger.warning(
                "no ROUGE evaluation with pipeline parallelism: generate with "
                "tools/generate.py from the saved checkpoint instead"
            )
        return {}
    examples = task.valid_examples
    mine = list(range(groups.dp_rank, len(examples), groups.dp_size))
    batch = task.eval_micro_batch_size or trainer.run.ds.micro_batch_size
    texts = generate_targets(
        trainer.engine.module, task.tokenizer, [examples[i] for i in mine], task.generation, batch
    )
    gathered: list[Any] = [None] * groups.dp_size
    dist.all_gather_object(gathered, list(zip(mine, texts)), group=groups.dp_group)
    predictions = dict(pair for part in gathered for pair in part)
    ordered = [predictions[i] for i in range(len(examples))]
    scores = rouge(ordered, [e.target_text for e in examples])
    if groups.rank == 0:
        for example, text in list(zip(examples, ordered))[:3]:
            logger.info("%s: generated %r, reference %r", example.where, text, example.target_text)
    return scores
