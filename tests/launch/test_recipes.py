"""The real-cluster recipes in examples/ are valid for our CLI and match the table of
docs/blank-infilling.md#released-recipes.

Each recipe runs with ``DRY_RUN=1`` (it prints its command, starts nothing); the launcher part is
parsed by the launcher's own argument parser, the trainer part by ``pretrain_glm.py``'s parser and
validation (``build_run_config``, as on a CUDA cluster of the recipe's size). The recipes use the
official tokenizer flags on the bundled vocabularies, so the tokenizer they build is checked against
the official ids (docs/tokenizers.md), and a corpus preprocessed with exactly those flags passes
the data check (``check_data=True``) while a corpus of the other tokenizer does not.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.launch.launchers import REPO_ROOT
from tests.tools.cli import check_tool

EXAMPLES = REPO_ROOT / "examples"
WORLD_SIZE = 64

# docs/blank-infilling.md#released-recipes and docs/model.md#presets (sizes, parameter counts).
# Base and Large share the BERT-style objective, tokenizer ids and optimizer settings; only size,
# iterations, peak LR and the tokenizer's model type differ.
_BLANK_INFILLING_RECIPE: dict[str, Any] = dict(
    probs=(1.0, 0.0),
    task_mask=False,
    ratio=0.05,
    warmup=0.05,
    betas=[0.9, 0.98],
    eps=1e-6,
    wd=0.1,
    micro=16,
    zero=0,  # the official JSONs have no ZeRO section; fp16 at stage 0 works (docs/training.md)
    max_positions=512,
    save_interval=5000,
    tokenizer_type="BertWordPieceTokenizer",
    # docs/tokenizers.md, "Command-token ids": BERT uncased (no [dBLOCK]: no block masking)
    vocab=30526,
    padded_vocab=30592,
    ids=dict(
        pad=0, eos=0, cls=101, sep=102, unk=100, mask=103, sop=30522, eop=30523, gmask=30524,
        smask=30525, dblock=None,
    ),
)  # fmt: skip
EXPECTED: dict[str, dict[str, Any]] = {
    "base": dict(
        _BLANK_INFILLING_RECIPE,
        layers=12,
        hidden=768,
        heads=12,
        params=109.3e6,
        iters=150_000,
        decay=120_000,
        lr=4e-4,
        model_type="bert-base-uncased",
    ),
    "large": dict(
        _BLANK_INFILLING_RECIPE,
        layers=24,
        hidden=1024,
        heads=16,
        params=334.7e6,
        iters=200_000,
        decay=160_000,
        lr=2e-4,
        model_type="bert-large-uncased",
    ),
    "10b": dict(
        layers=48,
        hidden=4096,
        heads=64,
        params=9.88e9,
        probs=(0.5, 0.3),
        task_mask=True,
        iters=250_000,
        decay=175_000,
        lr=1e-4,
        ratio=0.1,
        warmup=0.04,
        betas=[0.9, 0.95],
        eps=1e-8,
        wd=0.1,
        micro=21,
        zero=2,
        max_positions=1024,
        save_interval=2000,
        tokenizer_type="GPT2BPETokenizer",
        model_type=None,  # the official recipe leaves it out: gpt2
        # GPT-2 with [dBLOCK] appended, since the recipe sets --block-mask-prob 0.1
        vocab=50266,
        padded_vocab=50304,
        ids=dict(
            pad=50256, eos=50256, sop=50257, eop=50258, cls=50259, mask=50260, sep=50261,
            unk=50262, gmask=50263, smask=50264, dblock=50265,
        ),
    ),
}  # fmt: skip
_SETTINGS = ("NUM_NODES", "GPUS_PER_NODE", "LAUNCHER", "MASTER_ADDR", "NODE_RANK", "NO_SSH")
_OVERRIDES = ("VOCAB_FILE", "MERGE_FILE", "TP_SIZE", "SAVE_DIR")


def dry_run(recipe: str, *extra: str, **env: str) -> list[str]:
    """The recipe's command with ``DRY_RUN=1``, one argument per element. Launch settings and
    tokenizer overrides of the calling environment are dropped unless given in ``env``."""
    environ = {**os.environ, "DRY_RUN": "1", "DATA_PATH": "/data/corpus_text_document", **env}
    for name in (*_SETTINGS, *_OVERRIDES):
        if name not in env:
            environ.pop(name, None)
    done = subprocess.run(
        ["bash", str(EXAMPLES / f"pretrain_glm_{recipe}.sh"), *extra],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def split_command(command: list[str]) -> tuple[list[str], list[str]]:
    script = command.index(str(REPO_ROOT / "pretrain_glm.py"))
    return command[:script], command[script + 1 :]


def trainer_argv(recipe: str, **env: str) -> list[str]:
    return split_command(dry_run(recipe, **env))[1]


def tokenizer_flags(argv: list[str]) -> list[str]:
    """The recipe's tokenizer flags with their values (what preprocessing must be given)."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("--tokenizer-type", "--tokenizer-model-type", "--vocab-file", "--merge-file"):
            out += [arg, argv[i + 1]]
    return out


def validate(argv: list[str], *, check_data: bool = False) -> Any:
    from megatron_glm.training.arguments import build_parser, build_run_config

    return build_run_config(
        build_parser().parse_args(argv), world_size=WORLD_SIZE, cuda=True, check_data=check_data
    )


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_is_valid_and_matches_the_released_config(recipe: str) -> None:
    from megatron_glm.data.tokenizers import tokenizer_from_spec

    launch, trainer = split_command(dry_run(recipe, NUM_NODES="8", MASTER_ADDR="worker-0"))
    assert launch[:3] == ["deepspeed", "--hostfile", str(EXAMPLES / "hostfile")]
    run = validate(trainer)
    want = EXPECTED[recipe]
    model, training, data, ds = run.model, run.training, run.data, run.ds
    infill = data.infilling
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (
        want["layers"],
        want["hidden"],
        want["heads"],
    )
    assert model.num_parameters() == pytest.approx(want["params"], rel=2e-3)
    assert model.checkpoint_activations
    assert model.max_sequence_length == want["max_positions"]
    # --seq-length is the official raw sample length n; the input adds two tokens per blank
    assert (data.seq_length, data.input_length) == (512, 586)
    assert data.split_fractions == pytest.approx((0.949, 0.05, 0.001))
    assert data.seed == training.seed == 1234
    assert (infill.bert_prob, infill.gap_sentence_prob) == want["probs"]
    assert infill.task_mask is want["task_mask"] and infill.gpt_infill_prob == 0.5
    assert infill.avg_block_length == 3
    tenb = recipe == "10b"
    assert (infill.gpt_min_ratio, infill.block_mask_prob, infill.short_seq_prob) == (
        (0.25, 0.1, 0.02) if tenb else (0.5, 0.0, 0.0)  # 0.5: the default, unused at bert_prob 1
    )
    assert (training.train_iters, training.decay_iters) == (want["iters"], want["decay"])
    assert training.lr_decay_style == "cosine"
    assert ds.peak_lr == want["lr"] and training.final_lr_ratio(ds.peak_lr) == want["ratio"]
    assert training.warmup == want["warmup"]
    assert (training.save_interval, training.eval_interval, training.eval_iters) == (
        want["save_interval"],
        1000,
        10,
    )
    params = ds.config["optimizer"]["params"]
    assert (params["betas"], params["eps"], ds.weight_decay) == (
        want["betas"],
        want["eps"],
        want["wd"],
    )
    assert (ds.micro_batch_size, ds.zero_stage, ds.gradient_clipping) == (
        want["micro"],
        want["zero"],
        1.0,
    )
    assert ds.config["zero_optimization"]["stage"] == want["zero"]
    assert ds.precision == "fp16" and ds.config["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert ds.train_batch_size == want["micro"] * WORLD_SIZE

    # The official tokenizer flags, no vocabulary file: the bundled released vocabulary.
    spec = data.tokenizer_spec
    assert (spec.tokenizer_type, spec.tokenizer_model_type) == (
        want["tokenizer_type"],
        want["model_type"],
    )
    assert (spec.vocab_file, spec.merge_file, spec.block_mask_token) == (None, None, tenb)
    tok = tokenizer_from_spec(spec)
    ids = {name: tok.command_tokens[name] for name in want["ids"] if name != "dblock"}
    ids["dblock"] = tok.dblock_id
    assert ids == want["ids"]
    assert (tok.vocab_size, model.vocab_size, model.padded_vocab_size) == (
        want["vocab"],
        want["vocab"],
        want["padded_vocab"],
    )


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_header_names_its_preprocessing_flags(recipe: str) -> None:
    """The recipe's comment tells the user to preprocess with exactly its tokenizer flags."""
    header = []
    for line in (EXAMPLES / f"pretrain_glm_{recipe}.sh").read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    found = re.search(r"tools/preprocess_data\.py((?: --[\w-]+ [\w.-]*\w)+)", " ".join(header))
    assert found, header
    assert found.group(1).split() == tokenizer_flags(trainer_argv(recipe))


def test_recipe_vocabulary_overrides(tmp_path: Path) -> None:
    """VOCAB_FILE / MERGE_FILE are passed only when set, and reach the tokenizer."""
    from megatron_glm.data.tokenizers import tokenizer_from_spec

    bert = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]
    (tmp_path / "vocab.txt").write_text("\n".join(bert) + "\n")
    gpt2 = {chr(0x100 + i): i for i in range(500)}
    gpt2["<|endoftext|>"] = 500
    (tmp_path / "vocab.json").write_text(json.dumps(gpt2))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")

    for recipe in ("base", "large"):
        argv = trainer_argv(recipe, VOCAB_FILE=str(tmp_path / "vocab.txt"))
        assert tokenizer_flags(argv)[-2:] == ["--vocab-file", str(tmp_path / "vocab.txt")]
        assert "--merge-file" not in argv
        tok = tokenizer_from_spec(validate(argv).data.tokenizer_spec)
        assert (tok.vocab_size, tok.command_tokens["sop"]) == (1004, 1000)  # 1000 + 4 appended
        assert "--vocab-file" not in trainer_argv(recipe, VOCAB_FILE="")

    argv = trainer_argv(
        "10b", VOCAB_FILE=str(tmp_path / "vocab.json"), MERGE_FILE=str(tmp_path / "merges.txt")
    )
    assert tokenizer_flags(argv) == [
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        str(tmp_path / "vocab.json"),
        "--merge-file",
        str(tmp_path / "merges.txt"),
    ]
    tok = tokenizer_from_spec(validate(argv).data.tokenizer_spec)
    assert (tok.eos_id, tok.command_tokens["sop"], tok.dblock_id, tok.vocab_size) == (
        500,
        501,
        509,  # after sop eop cls mask sep unk gMASK sMASK
        510,
    )


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Python documentation paragraphs preprocessed, per recipe, with the recipe's own tokenizer
    flags (as examples/README.md says): 240 documents, enough for the 5 % validation split to
    hold a raw sample of 512 tokens."""
    root = tmp_path_factory.mktemp("recipe_corpora")
    jsonl = root / "docs.jsonl"
    with (
        gzip.open(REPO_ROOT / "data" / "python-docs-en.jsonl.gz", "rt", encoding="utf-8") as src,
        open(jsonl, "w", encoding="utf-8") as dst,
    ):
        for _, line in zip(range(240), src):
            dst.write(line)
    out = {}
    for recipe in sorted(EXPECTED):
        prefix = root / recipe
        check_tool(
            "tools/preprocess_data.py",
            "--input",
            str(jsonl),
            "--output-prefix",
            str(prefix),
            "--append-eod",
            "--workers",
            "1",
            "--no-progress",
            *tokenizer_flags(trainer_argv(recipe)),
        )
        out[recipe] = Path(f"{prefix}_text_document")
    return out


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_accepts_data_preprocessed_with_its_flags(
    recipe: str, corpora: dict[str, Path]
) -> None:
    from megatron_glm.training.arguments import ConfigError

    run = validate(trainer_argv(recipe, DATA_PATH=str(corpora[recipe])), check_data=True)
    assert run.data.data_path == [str(corpora[recipe])]

    # Negative control: the other vocabulary's corpus is refused by the tokenizer record that
    # tools/preprocess_data.py wrote, in both directions (BERT ids < 30526 fit GPT-2's range, so
    # only the record tells them apart).
    other = corpora["base" if recipe == "10b" else "10b"]
    with pytest.raises(ConfigError) as err:
        validate(trainer_argv(recipe, DATA_PATH=str(other)), check_data=True)
    assert "was made with another tokenizer" in str(err.value)


def test_base_and_large_corpora_are_the_same(corpora: dict[str, Path]) -> None:
    """bert-base-uncased and bert-large-uncased are one released vocabulary (examples/README.md:
    Base's files serve Large)."""
    for suffix in (".bin", ".idx"):
        base = Path(f"{corpora['base']}{suffix}").read_bytes()
        assert base == Path(f"{corpora['large']}{suffix}").read_bytes()


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_launch_variants_parse(recipe: str) -> None:
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from torch.distributed.run import get_args_parser as torchrun_parser

    one_node, _ = split_command(dry_run(recipe, GPUS_PER_NODE="4"))
    parsed = deepspeed_args([*one_node[1:], "pretrain_glm.py"])
    assert (parsed.num_gpus, parsed.master_port) == (4, 29500)

    no_ssh, _ = split_command(
        dry_run(recipe, NUM_NODES="2", NO_SSH="1", NODE_RANK="1", MASTER_ADDR="10.0.0.1")
    )
    parsed = deepspeed_args([*no_ssh[1:], "pretrain_glm.py"])
    assert (parsed.no_ssh, parsed.node_rank, parsed.master_addr, parsed.num_nodes) == (
        True,
        1,
        "10.0.0.1",
        2,
    )

    torchrun, trainer = split_command(
        dry_run(
            recipe,
            "--dry-run",
            "--dry-run-world-size",
            "64",
            LAUNCHER="torchrun",
            NUM_NODES="2",
            NODE_RANK="0",
            MASTER_ADDR="10.0.0.1",
        )
    )
    parsed = torchrun_parser().parse_args([*torchrun[1:], "pretrain_glm.py"])
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank, parsed.master_addr) == (
        "2",
        "8",
        0,
        "10.0.0.1",
    )
    # extra arguments reach the trainer, last (examples/README.md's --dry-run check)
    assert trainer[-3:] == ["--dry-run", "--dry-run-world-size", "64"]

    mpirun, _ = split_command(
        dry_run(recipe, LAUNCHER="mpirun", NUM_NODES="2", MASTER_ADDR="10.0.0.1")
    )
    assert mpirun[:3] == ["mpirun", "-np", "16"] and mpirun[-1] == "python"
    assert "MASTER_ADDR=10.0.0.1" in mpirun


def test_recipe_refuses_multi_node_without_master() -> None:
    environ = {**os.environ, "DRY_RUN": "1", "NUM_NODES": "2", "DATA_PATH": "d"}
    environ.pop("MASTER_ADDR", None)
    done = subprocess.run(
        ["bash", str(EXAMPLES / "pretrain_glm_base.sh")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr
