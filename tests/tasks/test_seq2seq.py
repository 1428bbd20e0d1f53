"""Seq2seq finetuning (megatron_glm/tasks/seq2seq.py): the rows, both file formats, counted
truncation, label smoothing (against its definition, and TP2 against TP1), ROUGE, and a finetune
through ``finetune_glm.py`` that learns to copy (ROUGE-L >= 0.9 by generation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_glm.tasks.data import TaskDataError
from megatron_glm.tasks.generation_eval import rouge
from megatron_glm.tasks.seq2seq import (
    Seq2SeqCollator,
    Seq2SeqSettings,
    load_split,
    smoothed_token_loss,
)
from tests.distributed.harness import run_distributed
from tests.tasks.conftest import MODEL_ARGS
from tests.tasks.synthetic import write_seq2seq
from tests.training.helpers import launch, write_ds_config


def _jsonl(path: Path, pairs: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))


def test_rows_put_the_source_in_part_a_and_the_target_in_part_b(
    tmp_path: Path, tokenizer: Any
) -> None:
    _jsonl(tmp_path / "train.jsonl", [{"source": "module function", "target": "type"}])
    settings = Seq2SeqSettings(str(tmp_path), src_seq_length=8, tgt_seq_length=4)
    (example,), _ = load_split(settings, tokenizer, "train")
    source, target = tokenizer.encode("module function"), tokenizer.encode("type")
    assert example.part_a == (tokenizer.cls_id, *source, tokenizer.gmask_id)
    assert example.target == (*target, tokenizer.eop_id)
    mb = Seq2SeqCollator(tokenizer, 12)([{"example": example, "weight": 1.0}])
    sep = len(example.part_a)
    assert mb["tokens"].shape == (1, 12) and int(mb["sep"][0]) == sep
    assert mb["tokens"][0, sep : sep + 2].tolist() == [tokenizer.sop_id, *target]
    assert mb["targets"][0, sep : sep + 2].tolist() == [*target, tokenizer.eop_id]
    assert mb["position_ids"][0, 0, sep : sep + 2].tolist() == [sep - 1, sep - 1]  # the blank
    assert mb["position_ids"][0, 1, sep : sep + 2].tolist() == [1, 2]
    assert mb["loss_mask"][0].tolist() == [0.0] * sep + [1.0, 1.0] + [0.0] * (12 - sep - 2)

    smask = Seq2SeqSettings(str(tmp_path), 8, 4, blank="smask")
    (example,), _ = load_split(smask, tokenizer, "train")
    assert example.part_a[-2:] == (tokenizer.smask_id, tokenizer.eos_id)


def test_line_files_and_bad_input(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "train.source").write_text("module function\n" + "set " * 40 + "\n")
    (tmp_path / "train.target").write_text("type\nnew\n")
    settings = Seq2SeqSettings(str(tmp_path), src_seq_length=8, tgt_seq_length=4)
    examples, truncations = load_split(settings, tokenizer, "train")
    # the long source is cut to the limit, counted and located
    assert len(examples) == 2 and len(examples[1].part_a) == 8
    assert truncations.count == 1
    assert truncations.report(2).startswith("train: 1 of 2 examples truncated to fit: ")
    assert f"{tmp_path / 'train.source'}:2 (" in truncations.report(2)

    (tmp_path / "train.target").write_text("type\n")
    with pytest.raises(TaskDataError, match="has 2 lines but .* has 1"):
        load_split(settings, tokenizer, "train")
    bad = tmp_path / "bad"
    _jsonl(bad / "val.jsonl", [{"source": "a", "target": "b"}, {"source": "a"}, {"target": ""}])
    with pytest.raises(TaskDataError) as err:
        load_split(Seq2SeqSettings(str(bad), 8, 4), tokenizer, "valid")
    assert err.value.problems == [
        f"{bad / 'val.jsonl'}:2: missing field 'target'",
        f"{bad / 'val.jsonl'}:3: missing field 'source'",
    ]


def test_label_smoothing_matches_its_definition() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 16, dtype=torch.float64), torch.randint(0, 16, (5,))
    eps = 0.1
    logp = F.log_softmax(logits, -1)
    expected = (1 - eps) * -logp.gather(-1, labels[:, None])[:, 0] - eps * logp.mean(-1)
    got = smoothed_token_loss(logits, labels, None, eps)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def _smoothing_rank(rank: int, world_size: int, logits: torch.Tensor, labels: torch.Tensor) -> Any:
    group = dist.new_group(list(range(world_size)))
    shard = logits.chunk(world_size, -1)[rank].clone().requires_grad_(True)
    loss = smoothed_token_loss(shard, labels, group, 0.2).sum()
    loss.backward()
    grads = [torch.empty_like(shard) for _ in range(world_size)]
    dist.all_gather(grads, shard.grad, group=group)
    return loss.detach(), torch.cat(grads, -1)


def test_label_smoothing_tp2_equals_tp1() -> None:
    torch.manual_seed(1)
    logits, labels = torch.randn(6, 32), torch.randint(0, 32, (6,))
    full = logits.clone().requires_grad_(True)
    loss = smoothed_token_loss(full, labels, None, 0.2).sum()
    loss.backward()
    for got_loss, got_grad in run_distributed(_smoothing_rank, 2, logits, labels):
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, full.grad, rtol=1e-5, atol=1e-6)


def test_rouge() -> None:
    scores = rouge(["the cat sat", "a b"], ["the cat sat", "c d"])
    assert scores == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5}


def test_finetune_learns_to_copy(tmp_path: Path, pretrained: Path, glm_corpus: Any) -> None:
    data = write_seq2seq(tmp_path / "copy", num_train=400, num_valid=40, reverse=False)
    ds = write_ds_config(tmp_path / "ds.json", train_batch=16, micro=16, lr=3e-3)
    save = tmp_path / "run"
    args = [
        *MODEL_ARGS,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(glm_corpus.tokenizer_model),
        "--task",
        "seq2seq",
        "--data-dir",
        str(data),
        "--load-pretrained",
        str(pretrained),
        "--src-seq-length",
        "16",
        "--tgt-seq-length",
        "12",
        "--label-smoothing",
        "0.05",
        "--epochs",
        "12",
        "--warmup",
        "0.05",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--num-workers",
        "0",
        "--no-progress-bar",
        "--deepspeed_config",
        str(ds),
        "--save",
        str(save),
    ]
    result = launch(1, args, log_dir=tmp_path, script="finetune_glm.py")
    assert result.ok, result.describe()
    results = json.loads((save / "results.json").read_text())
    assert results["task"] == "seq2seq" and results["truncated"] == {"train": 0, "valid": 0}
    assert results["metrics"]["rougeL"] >= 0.9, results
