"""Command line -> RunConfig: presets, derived values, and every invalid combination refused
before any process-group work, all problems in one message (docs/training.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_glm.data.indexed_dataset import IndexedDatasetBuilder
from megatron_glm.training import arguments
from megatron_glm.training.arguments import ConfigError, parse_run_config
from tests.tools.cli import preprocess_jsonl
from tests.training.helpers import REPO, Corpus, tiny_model_args, write_ds_config


def _argv(corpus: Corpus, ds: Path, *extra: str, data: str | None = None) -> list[str]:
    data_args = corpus.data_args()
    if data is not None:
        data_args[1] = data
    return [
        *tiny_model_args(),
        *data_args,
        "--train-iters",
        "10",
        "--deepspeed_config",
        str(ds),
        *extra,
    ]


def _problems(argv: list[str], world_size: int = 1) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_run_config(argv, world_size, cuda=False)
    assert str(info.value).count("\n  - ") == len(info.value.problems)
    return info.value.problems


def _one_problem_containing(problems: list[str], *needles: str) -> None:
    matching = [p for p in problems if all(n in p for n in needles)]
    assert len(matching) == 1, (needles, problems)


def test_valid_command_line(tmp_path: Path, glm_corpus: Corpus) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=8, micro=2)
    run = parse_run_config(
        _argv(glm_corpus, ds, "--tensor-model-parallel-size", "2"), 4, cuda=False
    )
    assert run.model.vocab_size == 512  # from the tokenizer
    assert (run.data_parallel_size, run.ds.gradient_accumulation_steps) == (2, 2)
    assert run.ds.config["gradient_accumulation_steps"] == 2
    assert run.training.lr == run.ds.peak_lr == 1e-3  # the JSON's lr (no --lr given)
    assert run.ds.config["optimizer"]["params"]["torch_adam"] is True  # CPU: no JIT FusedAdam
    assert run.ds.precision == "fp32" and run.ds.zero_stage == 0


def test_preset_with_overrides(tmp_path: Path, glm_corpus: Corpus) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4)
    argv = [
        *glm_corpus.data_args(),
        "--preset",
        "tiny",
        "--num-layers",
        "3",
        "--train-iters",
        "5",
        "--seq-length",
        "64",
        "--deepspeed_config",
        str(ds),
        "--lr",
        "1e-3",
    ]
    run = parse_run_config(argv, 1, cuda=False)
    assert (run.model.num_layers, run.model.hidden_size, run.model.num_attention_heads) == (
        3,
        64,
        4,
    )
    assert run.model.max_sequence_length == 128  # the preset's, not --seq-length


def test_every_layout_problem_in_one_message(tmp_path: Path, glm_corpus: Corpus) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4)
    argv = _argv(
        glm_corpus,
        ds,
        "--num-attention-heads",
        "8",
        "--hidden-size",
        "48",
        "--tensor-model-parallel-size",
        "3",
        "--pipeline-model-parallel-size",
        "4",
        "--seq-length",
        "256",
        data=str(tmp_path / "missing"),
    )
    problems = _problems(argv, world_size=8)
    _one_problem_containing(problems, "tensor-model-parallel-size 3", "num-attention-heads 8")
    _one_problem_containing(problems, "pipeline-model-parallel-size 4", "num-layers 2")
    _one_problem_containing(problems, "world size 8", "12")
    _one_problem_containing(problems, "missing.bin")
    _one_problem_containing(problems, "seq-length 256", "max-position-embeddings 64")


def test_deepspeed_config_problems(
    tmp_path: Path, glm_corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a CPU without native fp16 (this one may have it: AVX512-FP16 / AMX-FP16)
    monkeypatch.setattr(arguments, "_cpu_fp16_supported", lambda: False)
    ds = write_ds_config(
        tmp_path / "ds.json",
        train_batch=4,
        micro=4,
        gas=1,
        zero_stage=2,
        scheduler={"type": "WarmupLR"},
        fp16={"enabled": True},
    )
    problems = _problems(
        _argv(glm_corpus, ds, "--pipeline-model-parallel-size", "2", "--lr", "2e-3"), world_size=2
    )
    _one_problem_containing(problems, "ZeRO stage 2", "PipelineEngine supports ZeRO stages 0 and 1")
    _one_problem_containing(problems, "'scheduler'")
    _one_problem_containing(problems, "fp16 needs a CUDA device")
    _one_problem_containing(problems, "--lr 0.002", "optimizer.params.lr 0.001")
    # micro 4 * gas 1 * dp (2 / pp 2 = 1) = 4: the batch arithmetic holds here
    assert not any("batch arithmetic" in p for p in problems)


def test_batch_arithmetic(tmp_path: Path, glm_corpus: Corpus) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4, gas=1)
    problems = _problems(_argv(glm_corpus, ds), world_size=2)
    _one_problem_containing(problems, "batch arithmetic", "train_batch_size (4)", "= 8")


def test_tokenizer_and_data_mismatches(tmp_path: Path, glm_corpus: Corpus) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4)
    foreign = tmp_path / "foreign"  # made with a bigger vocabulary than the 512-token tokenizer
    builder = IndexedDatasetBuilder(str(foreign), np.uint16)
    builder.add_document(np.arange(0, 2000, 3))
    builder.finalize()
    _one_problem_containing(
        _problems(_argv(glm_corpus, ds, data=str(foreign))), "token id 1998", "different tokenizer"
    )

    narrow = tmp_path / "narrow"  # uint8 cannot hold 512 ids
    builder = IndexedDatasetBuilder(str(narrow), np.uint8)
    builder.add_document(np.arange(0, 200))
    builder.finalize()
    _one_problem_containing(
        _problems(_argv(glm_corpus, ds, data=str(narrow))), "uint8", "too narrow"
    )

    _one_problem_containing(
        _problems(_argv(glm_corpus, ds, "--vocab-size", "256")),
        "tokenizer has 512 tokens",
        "--vocab-size 256",
    )


def test_sentinel_tokens_enlarge_the_model_vocabulary(tmp_path: Path, glm_corpus: Corpus) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4)
    run = parse_run_config(_argv(glm_corpus, ds, "--sentinel-token"), 1, cuda=False)
    assert run.model.vocab_size > 512 and (run.model.vocab_size - 512) % 2 == 0
    problems = _problems(_argv(glm_corpus, ds, "--sentinel-token", "--vocab-size", "512"))
    _one_problem_containing(problems, "sentinel tokens", "--vocab-size 512")


def test_bad_input_subprocess_exits_before_any_process_group(
    tmp_path: Path, glm_corpus: Corpus
) -> None:
    ds = write_ds_config(tmp_path / "ds.json", train_batch=4, micro=4)
    argv = _argv(
        glm_corpus,
        ds,
        "--num-attention-heads",
        "3",
        "--hidden-size",
        "48",
        "--tensor-model-parallel-size",
        "2",
        data=str(tmp_path / "nowhere"),
    )
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "pretrain_glm.py", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # world size 2 but nobody else starts: any process-group work would hang, not exit 2
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "2 problem(s)" in proc.stderr, proc.stderr
    assert "nowhere.bin" in proc.stderr and "num-attention-heads 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_config_is_read_as_json(tmp_path: Path, glm_corpus: Corpus) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_problem_containing(_problems(_argv(glm_corpus, bad)), "cannot be read as JSON")
    lr_less = tmp_path / "nolr.json"
    lr_less.write_text(json.dumps({"train_batch_size": 4, "optimizer": {"type": "AdamW"}}))
    _one_problem_containing(_problems(_argv(glm_corpus, lr_less)), "no learning rate")


def test_data_made_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    """tools/preprocess_data.py records the tokenizer's identity next to the dataset; a run with a
    tokenizer that would read the ids as other tokens is refused, even when the ids fit."""
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": f"Paragraph {i} of a small corpus."}) for i in range(40))
    )
    bert = [
        "--tokenizer-type",
        "BertWordPieceTokenizer",
        "--tokenizer-model-type",
        "bert-base-uncased",
    ]
    prefix = preprocess_jsonl(jsonl, tmp_path / "bert", bert)
    record = json.loads(Path(prefix + ".tokenizer.json").read_text())
    assert record["vocab_size"] == 30526 and record["command_tokens"]["cls"] == 101
    ds = write_ds_config(tmp_path / "ds.json", train_batch=2, micro=2)
    base = [*tiny_model_args(), "--data-path", prefix, "--train-iters", "2", "--split", "1,0,0"]
    base += ["--deepspeed_config", str(ds)]
    # the same vocabulary under its other name: accepted
    parse_run_config([*base, "--tokenizer-type", "BertWordPieceLowerCase"], 1, cuda=False)
    # GPT-2's ids are a superset of the range, but mean other tokens: refused
    problems = _problems([*base, "--tokenizer-type", "GPT2BPETokenizer"])
    _one_problem_containing(
        problems, "was made with another tokenizer", "--tokenizer-type BertWordPieceTokenizer"
    )
