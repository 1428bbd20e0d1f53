"""The real-cluster recipes in examples/ are valid for our CLI and match GLM_SPEC §3's table.

Each recipe runs with ``DRY_RUN=1`` (it prints its command, starts nothing); the launcher part is
parsed by the launcher's own argument parser, the trainer part by ``pretrain_glm.py``'s parser and
validation (``build_run_config``, as on a CUDA cluster of the recipe's size; no data is read).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.launch.launchers import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"

# GLM_SPEC §3 (released recipes) and §1 (sizes, parameter counts). Base and Large share the
# BERT-style objective and optimizer settings; only size, iterations and peak LR differ.
_BLANK_INFILLING_RECIPE = dict(
    probs=(1.0, 0.0),
    task_mask=False,
    ratio=0.05,
    warmup=0.05,
    betas=[0.9, 0.98],
    eps=1e-6,
    wd=0.1,
    micro=16,
    zero=1,  # not the official 0: DeepSpeed's stage-0 fp16 never scales the loss
)
EXPECTED = {
    "base": dict(
        _BLANK_INFILLING_RECIPE,
        layers=12,
        hidden=768,
        heads=12,
        params=109.3e6,
        iters=150_000,
        decay=120_000,
        lr=4e-4,
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
    ),
}


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Synthetic vocabularies shaped like BERT uncased (30522) and GPT-2 (50257)."""
    root = tmp_path_factory.mktemp("recipe_vocabs")
    bert = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert += [f"w{i}" for i in range(30522 - len(bert))]
    (root / "vocab.txt").write_text("\n".join(bert) + "\n")
    gpt2 = {chr(0x100 + i): i for i in range(50256)}
    gpt2["<|endoftext|>"] = 50256
    (root / "vocab.json").write_text(json.dumps(gpt2))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return {
        "bert": str(root / "vocab.txt"),
        "gpt2_vocab": str(root / "vocab.json"),
        "gpt2_merges": str(root / "merges.txt"),
    }


def dry_run(recipe: str, vocab_files: dict[str, str], *extra: str, **env: str) -> list[str]:
    environ = {
        **os.environ,
        "DRY_RUN": "1",
        "DATA_PATH": "/data/corpus_text_document",
        "VOCAB_FILE": vocab_files["gpt2_vocab" if recipe == "10b" else "bert"],
        "MERGE_FILE": vocab_files["gpt2_merges"],
        **env,
    }
    for name in ("NUM_NODES", "GPUS_PER_NODE", "LAUNCHER", "MASTER_ADDR", "NODE_RANK", "NO_SSH"):
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


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_is_valid_and_matches_the_released_config(
    recipe: str, vocab_files: dict[str, str]
) -> None:
    from megatron_glm.training.arguments import build_parser, build_run_config

    launch, trainer = split_command(
        dry_run(recipe, vocab_files, NUM_NODES="8", MASTER_ADDR="worker-0")
    )
    assert launch[:3] == ["deepspeed", "--hostfile", str(EXAMPLES / "hostfile")]
    run = build_run_config(
        build_parser().parse_args(trainer), world_size=64, cuda=True, check_data=False
    )
    want = EXPECTED[recipe]
    model, training, infill, ds = run.model, run.training, run.data.infilling, run.ds
    assert (model.num_layers, model.hidden_size, model.num_attention_heads) == (
        want["layers"],
        want["hidden"],
        want["heads"],
    )
    assert model.num_parameters() == pytest.approx(want["params"], rel=2e-3)
    assert model.checkpoint_activations
    assert run.data.seq_length == 512
    assert (infill.bert_prob, infill.gap_sentence_prob) == want["probs"]
    assert infill.task_mask is want["task_mask"] and infill.gpt_infill_prob == 0.5
    if recipe == "10b":
        assert (infill.gpt_min_ratio, infill.block_mask_prob, infill.short_seq_prob) == (
            0.25,
            0.1,
            0.02,
        )
        assert model.max_sequence_length == 1024
    assert (training.train_iters, training.decay_iters) == (want["iters"], want["decay"])
    assert training.lr_decay_style == "cosine"
    assert ds.peak_lr == want["lr"] and training.final_lr_ratio(ds.peak_lr) == want["ratio"]
    assert training.warmup == want["warmup"]
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
    assert ds.precision == "fp16" and ds.config["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert ds.train_batch_size == want["micro"] * 64


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_launch_variants_parse(recipe: str, vocab_files: dict[str, str]) -> None:
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from torch.distributed.run import get_args_parser as torchrun_parser

    one_node, _ = split_command(dry_run(recipe, vocab_files, GPUS_PER_NODE="4"))
    parsed = deepspeed_args([*one_node[1:], "pretrain_glm.py"])
    assert (parsed.num_gpus, parsed.master_port) == (4, 29500)

    no_ssh, _ = split_command(
        dry_run(
            recipe, vocab_files, NUM_NODES="2", NO_SSH="1", NODE_RANK="1", MASTER_ADDR="10.0.0.1"
        )
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
            vocab_files,
            "--exit-interval",
            "100",
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
    assert trainer[-2:] == ["--exit-interval", "100"]  # extra arguments reach the trainer

    mpirun, _ = split_command(
        dry_run(recipe, vocab_files, LAUNCHER="mpirun", NUM_NODES="2", MASTER_ADDR="10.0.0.1")
    )
    assert mpirun[:3] == ["mpirun", "-np", "16"] and mpirun[-1] == "python"
    assert "MASTER_ADDR=10.0.0.1" in mpirun


def test_recipe_refuses_multi_node_without_master(vocab_files: dict[str, str]) -> None:
    done = subprocess.run(
        ["bash", str(EXAMPLES / "pretrain_glm_base.sh")],
        env={
            **os.environ,
            "DRY_RUN": "1",
            "NUM_NODES": "2",
            "DATA_PATH": "d",
            "VOCAB_FILE": vocab_files["bert"],
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "MASTER_ADDR" in done.stderr
