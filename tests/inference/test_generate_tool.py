"""tools/generate.py end to end: pretrain a tiny GLM with pretrain_glm.py on a synthetic language,
then fill held-out blanks of that language through the tool (one process and TP 2 under torchrun).

The language: 20 sentences "SUBJECT VERB OBJECT." (one word of each class, all chosen by one
index i); a document is one of them six times. Pretraining uses the gap-sentence objective with
--task-mask, so every blank is a whole sentence under [sMASK]. Filling one needs what GLM's
blank infilling learns: read the subject off Part A by attention (it is the only word of its
class there), then the verb and object that go with it, the full stop and [eop]. 100 iterations
learn it (measured with these settings: training loss 2.45 at iteration 20, 0.015 at 100; all 154
blanks of 100 held-out prompts exact).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.distributed.harness import find_free_port
from tests.launch.launchers import BIN
from tests.tools.cli import REPO, preprocess_jsonl, run_tool

SUBJECTS = [
    "module",
    "function",
    "string",
    "file",
    "method",
    "code",
    "class",
    "list",
    "name",
    "type",
    "data",
    "exception",
    "line",
    "parameter",
    "error",
    "process",
    "result",
    "option",
    "message",
    "thread",
]
VERBS = [
    "will",
    "can",
    "has",
    "may",
    "should",
    "must",
    "does",
    "returns",
    "raise",
    "call",
    "read",
    "change",
    "need",
    "contain",
    "support",
    "match",
    "allow",
    "print",
    "format",
    "implement",
]
OBJECTS = [
    "value",
    "number",
    "argument",
    "instance",
    "version",
    "attribute",
    "variable",
    "command",
    "path",
    "directory",
    "reference",
    "system",
    "key",
    "point",
    "bytes",
    "time",
    "test",
    "case",
    "example",
    "object",
]
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer"]
TOKENIZER_MODEL = REPO / "tests" / "assets" / "tokenizers" / "pydocs_sp1k.model"


def sentence(i: int) -> str:
    return f"{SUBJECTS[i]} {VERBS[i]} {OBJECTS[i]}."


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint directory of a tiny GLM pretrained on the language: the 100 iterations take
    about 7 s; the whole process took 28 s to 3.5 minutes on a shared 2-core machine (load, and
    whether DeepSpeed rebuilds its CPU communication op)."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(2000):
            f.write(json.dumps({"text": " ".join([sentence(rng.randrange(20))] * 6)}) + "\n")
    tokenizer = [*TOKENIZER, "--tokenizer-model", str(TOKENIZER_MODEL)]
    data = preprocess_jsonl(corpus, root / "corpus", tokenizer)
    ds_config = root / "ds.json"
    ds_config.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 16,
                "gradient_clipping": 1.0,
                "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.98], "eps": 1e-6}},
            }
        )
    )
    save = root / "run"
    # a document is 24 tokens: [CLS] + 24 + [eos] + the next [CLS] = 27 raw tokens per sample,
    # so every sample holds one document
    done = run_tool(
        "pretrain_glm.py",
        *("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"),
        *("--seq-length", "27", "--max-position-embeddings", "32"),
        *tokenizer,
        *("--data-path", data, "--split", "100,0,0", "--num-workers", "0"),
        *("--bert-prob", "0", "--gap-sentence-prob", "1", "--task-mask"),
        *("--hidden-dropout", "0", "--attention-dropout", "0"),
        *("--train-iters", "100", "--lr", "5e-3", "--lr-decay-style", "constant"),
        *("--log-interval", "20", "--save", str(save), "--seed", "1", "--no-progress-bar"),
        *("--deepspeed", "--deepspeed_config", str(ds_config)),
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return save


def held_out(path: Path, seed: int, count: int) -> list[list[str]]:
    """``count`` prompts with one or two sentences blanked; returns the answers."""
    rng = random.Random(seed)
    answers = []
    with path.open("w") as f:
        for _ in range(count):
            parts = [sentence(rng.randrange(20))] * 6
            blanks = sorted(rng.sample(range(6), rng.choice([1, 2])))
            answers.append([parts[k] for k in blanks])
            prompt = " ".join("[sMASK]" if k in blanks else p for k, p in enumerate(parts))
            f.write(json.dumps({"prompt": prompt, "id": len(answers)}) + "\n")
    return answers


def test_fills_held_out_blanks(trained: Path, tmp_path: Path) -> None:
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    answers = held_out(prompts, seed=5, count=30)
    done = run_tool(
        "tools/generate.py",
        *("--load-pretrained", str(trained), "--input-file", str(prompts)),
        *("--output-file", str(out), "--temperature", "0", "--out-seq-length", "10"),
        *("--batch-size", "16"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == list(range(1, 31))  # input fields kept, in order
    pairs = [(b.strip(), a) for r, ans in zip(records, answers) for b, a in zip(r["blanks"], ans)]
    exact = sum(b == a for b, a in pairs) / len(pairs)
    assert exact >= 0.9, pairs
    first = records[0]
    assert first["output"] == " ".join([answers[0][0]] * 6)

    # --prompt, twice: one filled text per line
    done = run_tool(
        "tools/generate.py",
        *("--load-pretrained", str(trained), "--temperature", "0", "--out-seq-length", "10"),
        *("--prompt", f"{sentence(3)} [sMASK] {sentence(3)}"),
        *("--prompt", f"[sMASK] {sentence(7)}"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [" ".join([sentence(3)] * 3), " ".join([sentence(7)] * 2)]


def test_tp2_under_torchrun_equals_one_process(trained: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    held_out(prompts, seed=9, count=6)
    flags = ["--load-pretrained", str(trained), "--input-file", str(prompts)]
    flags += ["--num-beams", "2", "--out-seq-length", "10"]
    single = run_tool("tools/generate.py", *flags, "--output-file", str(tmp_path / "tp1.jsonl"))
    assert single.returncode == 0, single.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    torchrun = subprocess.run(
        [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(find_free_port())]
        + ["tools/generate.py", *flags, "--output-file", str(tmp_path / "tp2.jsonl")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert (tmp_path / "tp2.jsonl").read_text() == (tmp_path / "tp1.jsonl").read_text()


def test_bad_prompt_file(trained: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "a [MASK]"}\nnot json\n{"text": "x"}\n{"prompt": [3, 4, 2]}\n')
    done = run_tool(
        "tools/generate.py", "--load-pretrained", str(trained), "--input-file", str(prompts)
    )
    assert done.returncode == 2
    assert f"{prompts}:2: not valid JSON" in done.stderr
    assert f'{prompts}:3: needs a "prompt"' in done.stderr
    prompts.write_text('{"prompt": "fine[MASK]"}\n{"prompt": [3, 300, 2]}\n')
    done = run_tool(
        "tools/generate.py", "--load-pretrained", str(trained), "--input-file", str(prompts)
    )
    assert done.returncode == 2
    assert f"{prompts}:2: no [MASK], [sMASK] or [gMASK] to fill" in done.stderr
