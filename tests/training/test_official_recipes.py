"""The official GLM recipes and a Megatron ``pretrain_gpt.py`` command line run unchanged.

Every ``config/ds_block_*.sh`` of THUDM/GLM (``tests/assets/official_recipes``) goes through
``pretrain_glm.py --dry-run`` with only what a user must change (``recipe_argv``: the corpus, the
cluster paths, the model size) and its own DeepSpeed JSON; the corpus is preprocessed with the
recipe's own tokenizer flags. One recipe (Base: BERT vocabulary, fp16 at ZeRO stage 0) and one
Megatron line (HuggingFace tokenizer, bf16, Megatron batch/optimizer/schedule flags, two unweighted
prefixes, no DeepSpeed JSON) train for a few iterations.

fp16: this CPU has no native fp16, so DeepSpeed refuses it; as in tests/training/test_fp16.py the
capability query is simulated (the fp16 parameters, kernels and loss scaler run for real).
"""

from __future__ import annotations

import gzip
import json
import shlex
from pathlib import Path

import pytest

import pretrain_glm
from megatron_glm.training import arguments
from tests.tools.cli import preprocess_jsonl, run_tool
from tests.training.helpers import REPO, launch, read_log

ASSETS = REPO / "tests" / "assets" / "official_recipes"
RECIPES = sorted(p.stem for p in ASSETS.glob("ds_*.args"))
TINY_MODEL = {"--num-layers": "2", "--hidden-size": "64", "--num-attention-heads": "4"}
NUM_DOCS = 240  # enough for a 5% validation split of one 1024-token raw sample
# The recipes' tokenizer flags -> one preprocessed corpus each.
TOKENIZER_FLAGS = ("--tokenizer-type", "--tokenizer-model-type", "--fix-command-token")


def read_recipe(name: str) -> list[list[str]]:
    """The recipe's flags, each as [flag, values...]."""
    lines = (ASSETS / f"{name}.args").read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def tokenizer_argv(recipe: list[list[str]]) -> list[str]:
    return [tok for flag in recipe if flag[0] in TOKENIZER_FLAGS for tok in flag]


def recipe_argv(name: str, data_prefix: Path, workdir: Path) -> list[str]:
    """The recipe with only the data path, the cluster paths and the model size changed."""
    argv: list[str] = []
    for flag, *values in read_recipe(name):
        if flag == "--train-data":
            values = [str(data_prefix)]
            flag = "--data-path"
        elif flag == "--filter-english":
            continue  # a filter inside the official loader: filter before preprocessing
        elif flag in ("--save", "--load"):
            values = [str(workdir / flag[2:] / Path(values[0]).name)]
        elif flag == "--deepspeed_config":
            values = [str(ASSETS / values[0])]
        elif flag in TINY_MODEL:
            values = [TINY_MODEL[flag]]
        argv += [flag, *values]
    return argv


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Path]:
    """One corpus per distinct tokenizer of the recipes, preprocessed with exactly its flags:
    Python documentation paragraphs plus Chinese sentences (the Chinese recipes' language)."""
    root = tmp_path_factory.mktemp("official_corpora")
    jsonl = root / "docs.jsonl"
    chinese = "广义语言模型通过自回归空白填充进行预训练。它在自然语言理解和生成任务上都表现良好。"
    with (
        gzip.open(REPO / "data" / "python-docs-en.jsonl.gz", "rt", encoding="utf-8") as src,
        open(jsonl, "w", encoding="utf-8") as dst,
    ):
        for i, line in zip(range(NUM_DOCS), src):
            text = json.loads(line)["text"]
            if i % 3 == 0:
                text = chinese * 4 + "\n" + text
            dst.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    out: dict[tuple[str, ...], Path] = {}
    for name in RECIPES:
        key = tuple(tokenizer_argv(read_recipe(name)))
        if key in out:
            continue
        out[key] = Path(preprocess_jsonl(jsonl, root / f"corpus{len(out)}", key))
    return out


def corpus_for(name: str, corpora: dict[tuple[str, ...], Path]) -> Path:
    return corpora[tuple(tokenizer_argv(read_recipe(name)))]


@pytest.mark.parametrize("name", RECIPES)
def test_official_recipe_dry_run(
    name: str,
    corpora: dict[tuple[str, ...], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(arguments, "_cpu_fp16_supported", lambda: True)
    argv = recipe_argv(name, corpus_for(name, corpora), tmp_path)
    assert pretrain_glm.main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    recipe = {flag: values for flag, *values in read_recipe(name)}
    ds_json = json.loads((ASSETS / recipe["--deepspeed_config"][0]).read_text())
    seq = int(recipe["--seq-length"][0])
    # --seq-length is the raw sample length, as in the official code; the input is longer
    assert f"raw sample {seq} tokens (--seq-length), model input " in out
    assert "dry run OK" in out and "command-line dialect: official" in out
    assert "precision fp16" in out
    stage = (ds_json.get("zero_optimization") or {}).get("stage", 0)
    assert f"ZeRO stage {stage}" in out
    micro = ds_json["train_micro_batch_size_per_gpu"]
    gas = ds_json["gradient_accumulation_steps"]
    assert f"micro {micro} x accumulation {gas} x data-parallel 1" in out
    decay = int(recipe["--lr-decay-iters"][0])
    assert f"{recipe['--lr-decay-style'][0]} over {decay}" in out
    assert f"save {tmp_path / 'save'}" in out and recipe["--experiment-name"][0] in out
    # the official flags without effect here are named once
    assert out.count("accepted without effect") == 1


def test_official_recipe_unchanged_names_what_to_do(
    corpora: dict[tuple[str, ...], Path], tmp_path: Path
) -> None:
    argv = [tok for flag in read_recipe("ds_block_10B") for tok in flag]
    argv = [str(ASSETS / a) if a.endswith(".json") else a for a in argv]
    done = run_tool("pretrain_glm.py", *argv, "--dry-run")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--train-data" in done.stderr and "--data-path PREFIX" in done.stderr
    assert "tools/preprocess_data.py" in done.stderr
    assert "--filter-english" in done.stderr
    assert "Traceback" not in done.stderr


def test_official_base_recipe_trains_in_fp16_at_zero_stage_0(
    corpora: dict[tuple[str, ...], Path], tmp_path: Path
) -> None:
    name = "ds_block_base"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from tests.training.fp16_hooks import simulate_cpu_fp16\nsimulate_cpu_fp16()\n"
    )
    log = tmp_path / "log.jsonl"
    argv = recipe_argv(name, corpus_for(name, corpora), tmp_path)
    argv += ["--train-iters", "3", "--log-interval", "1", "--log-json", str(log)]
    argv += ["--num-workers", "0", "--no-progress-bar"]
    result = launch(1, argv, env={"PYTHONPATH": f"{REPO}:{site}"}, log_dir=tmp_path, timeout=400)
    assert result.ok, result.describe()
    records = read_log(log)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss_scale"] is not None for r in records)
    out = result.outputs[0]
    assert "model input 586 = raw + 2 x 37" in out  # --seq-length 512 is the raw length
    assert "--distributed-backend nccl needs CUDA" in out
    saved = tmp_path / "save" / "checkpoints" / "blocklm-blank"
    assert (saved / "latest").is_file(), sorted(p.name for p in tmp_path.rglob("*"))


def _train_hf_tokenizer(jsonl: Path, path: Path) -> None:
    """A user's own byte-level BPE tokenizer.json (the Rust ``tokenizers`` trainer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"])
    with open(jsonl, encoding="utf-8") as f:
        tok.train_from_iterator((json.loads(line)["text"] for line in f), trainer)
    tok.save(str(path))


def test_megatron_command_line_trains(tmp_path: Path) -> None:
    jsonl = tmp_path / "docs.jsonl"
    with (
        gzip.open(REPO / "data" / "python-docs-en.jsonl.gz", "rt", encoding="utf-8") as src,
        open(jsonl, "w", encoding="utf-8") as dst,
    ):
        for _, line in zip(range(80), src):
            dst.write(line)
    tokenizer = tmp_path / "tokenizer.json"
    _train_hf_tokenizer(jsonl, tokenizer)
    tok_args = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer)]
    prefixes = [preprocess_jsonl(jsonl, tmp_path / part, tok_args) for part in ("a", "b")]
    log = tmp_path / "log.jsonl"
    megatron = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128",
        "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-fraction", "0.25", "--train-samples", "24",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--bf16",
        "--recompute-activations", "--use-flash-attn", "--distributed-backend", "gloo",
        "--data-path", *prefixes, "--split", "98,2,0", *tok_args,
        "--save", str(tmp_path / "ckpt"), "--save-interval", "3",
        "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1",
        "--log-json", str(log), "--num-workers", "0", "--no-progress-bar",
        "--no-layout-free-state",
    ]  # fmt: skip
    dry = run_tool("pretrain_glm.py", *megatron, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "command-line dialect: megatron" in dry.stdout
    assert "6 iterations, LR 0.003 -> 0.0003 (cosine over 6, warmup 2)" in dry.stdout
    ds_json = json.loads(dry.stdout.split("DeepSpeed config: ", 1)[1].splitlines()[0])
    assert ds_json["train_batch_size"] == 4 and ds_json["train_micro_batch_size_per_gpu"] == 2
    assert ds_json["gradient_clipping"] == 1.0 and ds_json["bf16"] == {"enabled": True}
    assert ds_json["optimizer"]["type"] == "AdamW"
    assert ds_json["optimizer"]["params"]["weight_decay"] == 0.1
    result = launch(2, megatron, log_dir=tmp_path, timeout=300)
    assert result.ok, result.describe()
    records = read_log(log)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "ckpt" / "latest").is_file()
    saved = [p for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()]
    assert saved and not any((p / "layout_free").exists() for p in saved)  # opted out


def test_megatron_flag_contradicting_the_json_is_an_error(tmp_path: Path) -> None:
    argv = [
        *[f for flag in read_recipe("ds_block_base") for f in flag],
        "--micro-batch-size", "4", "--clip-grad", "0.5", "--bf16",
    ]  # fmt: skip
    argv = [str(ASSETS / a) if a.endswith(".json") else a for a in argv]
    args = arguments.build_parser().parse_args(argv)
    with pytest.raises(arguments.ConfigError) as err:
        arguments.build_run_config(args, 1, cuda=True, check_data=False)
    text = str(err.value)
    assert "--micro-batch-size 4 contradicts train_micro_batch_size_per_gpu = 16" in text
    assert "--clip-grad 0.5 contradicts gradient_clipping = 1.0" in text
    assert "--bf16 contradicts" in text and "which enables fp16" in text
