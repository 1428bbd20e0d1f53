"""Zero-shot evaluation (megatron_glm/tasks/zero_shot.py, tools/evaluate_lm.py): windows that
score every token once, perplexity against exp(mean token loss) computed here by hand, and the
exact rows of bidirectional and unidirectional LAMBADA scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from megatron_glm import GLMModel
from megatron_glm.tasks.data import Truncations
from megatron_glm.tasks.zero_shot import (
    LambadaExample,
    lambada_rows,
    perplexity_rows,
    window_spans,
)
from tests.tools.cli import REPO

IDS = SimpleNamespace(cls_id=3, eos_id=2, sop_id=7, pad_id=1, mask_id=4)


@pytest.mark.parametrize(("n", "window", "stride"), [(1, 4, 4), (9, 5, 2), (10, 4, 4), (23, 8, 3)])
def test_windows_score_every_token_but_the_first_once(n: int, window: int, stride: int) -> None:
    scored = [i for _, first, end in window_spans(n, window, stride) for i in range(first, end)]
    assert scored == list(range(1, n))
    for start, first, end in window_spans(n, window, stride):
        assert end - start <= window
        assert first - start == (1 if start == 0 else window - stride)  # the context


def _evaluate(tmp_path: Path, glm_corpus: Any, pretrained: Path, *flags: str) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_lm", REPO / "tools" / "evaluate_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    save = tmp_path / "eval"
    argv = [
        *flags,
        "--load-pretrained",
        str(pretrained),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(glm_corpus.tokenizer_model),
        "--save",
        str(save),
    ]
    assert module.main(argv) == 0
    return json.loads((save / "results.json").read_text())


def _by_hand(model: GLMModel, context: list[int], scored: list[int], tok: Any) -> float:
    """Summed log-probability of ``scored`` after ``context`` in Part A, built here from the
    definition (no megatron_glm row code)."""
    part_a = [tok.cls_id, *context, tok.mask_id]
    tokens = part_a + [tok.sop_id, *scored[:-1]]
    sep, blank = len(part_a), len(part_a) - 1
    positions = list(range(sep)) + [blank] * len(scored)
    blocks = [0] * sep + list(range(1, len(scored) + 1))
    with torch.no_grad():
        logits = model(
            torch.tensor([tokens]), torch.tensor([[positions, blocks]]), torch.tensor([sep])
        )[0]
    logp = F.log_softmax(logits.double(), -1)[sep:]
    return float(logp[torch.arange(len(scored)), torch.tensor(scored)].sum())


def test_perplexity_equals_exp_of_mean_token_loss(
    tmp_path: Path, tokenizer: Any, glm_corpus: Any, pretrained: Path
) -> None:
    text = "module function object type call set new use module"
    (tmp_path / "text.txt").write_text(text + "\n\n")
    doc = tokenizer.encode(text)
    assert len(doc) == 9
    # W = 5, S = 2: three windows scoring d[1:5], d[5:7] and d[7:9]
    results = _evaluate(
        tmp_path, glm_corpus, pretrained, "--task", "perplexity", "--valid-data",
        str(tmp_path / "text.txt"), "--seq-length", "5", "--overlapping-eval", "2",
    )  # fmt: skip
    model = GLMModel.from_pretrained(pretrained)
    total = (
        _by_hand(model, doc[0:1], doc[1:5], tokenizer)
        + _by_hand(model, doc[2:5], doc[5:7], tokenizer)
        + _by_hand(model, doc[4:7], doc[7:9], tokenizer)
    )
    metrics = results["metrics"]
    assert results["task"] == "perplexity" and metrics["tokens"] == 8
    assert metrics["perplexity"] == pytest.approx(math.exp(-total / 8), rel=1e-5)


def test_a_window_without_earlier_context_is_the_same_in_both_modes() -> None:
    doc = [11, 12, 13, 14]
    one = perplexity_rows([doc], 8, 8, IDS, unidirectional=False, blank=IDS.mask_id)
    two = perplexity_rows([doc], 8, 8, IDS, unidirectional=True, blank=IDS.mask_id)
    for a, b in zip(one, two):
        for field in ("tokens", "position_ids", "targets", "loss_mask"):
            assert (getattr(a, field) == getattr(b, field)).all(), field


def test_lambada_rows_bidirectional_and_unidirectional() -> None:
    example = LambadaExample("x:1", context=(21, 22, 23), answer=(31, 32))
    mask, cls, eos, sop, pad = IDS.mask_id, IDS.cls_id, IDS.eos_id, IDS.sop_id, IDS.pad_id

    def rows(unidirectional: bool) -> Any:
        truncations = Truncations("test")
        (row,) = lambada_rows(
            [example], 16, IDS, unidirectional=unidirectional, blank=mask, truncations=truncations
        )
        return row

    bi = rows(False)  # the context in Part A, only the answer in Part B
    assert bi.tokens.tolist() == [cls, 21, 22, 23, mask, eos, sop, 31]
    assert bi.sep == 6
    assert bi.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 4], [0, 0, 0, 0, 0, 0, 1, 2]]
    assert bi.targets.tolist() == [pad] * 6 + [31, 32]
    assert bi.loss_mask.tolist() == [0] * 6 + [1, 1]

    uni = rows(True)  # the context after its first token is a left-to-right Part B prefix
    assert uni.tokens.tolist() == [cls, 21, mask, eos, sop, 22, 23, 31]
    assert uni.sep == 4
    assert uni.position_ids.tolist() == [[0, 1, 2, 3, 2, 2, 2, 2], [0, 0, 0, 0, 1, 2, 3, 4]]
    assert uni.targets.tolist() == [pad] * 4 + [22, 23, 31, 32]
    assert uni.loss_mask.tolist() == [0] * 6 + [1, 1]  # only the answer counts


def test_lambada_truncation_is_counted() -> None:
    example = LambadaExample("f.jsonl:7", context=tuple(range(20, 40)), answer=(41,))
    truncations = Truncations("test")
    (row,) = lambada_rows(
        [example], 10, IDS, unidirectional=False, blank=4, truncations=truncations
    )
    assert row.tokens.size == 10 and row.tokens[1] == 34  # the oldest context tokens went
    assert truncations.count == 1 and truncations.places == ["f.jsonl:7 (14 tokens)"]


def test_evaluate_lm_lambada_runs_both_ways(
    tmp_path: Path, glm_corpus: Any, pretrained: Path
) -> None:
    data = tmp_path / "lambada.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in ("the module returns a list", "each file has one object", "set new type")
        )
    )
    for flag in ((), ("--unidirectional",)):
        results = _evaluate(
            tmp_path, glm_corpus, pretrained, "--task", "lambada", "--valid-data", str(data),
            "--seq-length", "32", *flag,
        )  # fmt: skip
        assert results["mode"] == ("unidirectional" if flag else "bidirectional")
        assert results["metrics"]["examples"] == 3
        assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
