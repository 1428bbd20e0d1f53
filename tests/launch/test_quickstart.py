"""examples/quickstart.sh end to end, shrunk: a 60-document corpus, a 1000-piece tokenizer and 12
iterations instead of the bundled corpus, 8000 pieces and 150 iterations (same script, same
launcher, same model). The full run is `make quickstart` (docs/quickstart.md)."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
from pathlib import Path

from tests.launch.launchers import BIN, REPO_ROOT
from tests.training.helpers import CORPUS, NUM_DOCS


def test_quickstart_script_small(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl.gz"
    with gzip.open(CORPUS, "rt", encoding="utf-8") as src, gzip.open(corpus, "wt") as dst:
        dst.writelines(itertools.islice(src, NUM_DOCS))
    out = tmp_path / "qs"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "OMP_NUM_THREADS": "1",
        "QUICKSTART_DIR": str(out),
        "QUICKSTART_CORPUS": str(corpus),
        "QUICKSTART_VOCAB": "1000",
        "QUICKSTART_ITERS": "12",
        "QUICKSTART_MIN_DROP": "0.3",
    }
    done = subprocess.run(
        ["bash", "examples/quickstart.sh"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "1/5 training a sentencepiece tokenizer (1000 pieces)" in output
    assert "5/5 filling a blank with the trained model" in output
    assert '"output": ' in output and '"blanks": [' in output
    assert "OK: loss fell from" in output
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    records = [
        json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(2, 13, 2))
    assert (out / "train" / "checkpoints" / "latest").read_text().strip() == "12"
    assert list((out / "train" / "tensorboard").iterdir()), "no TensorBoard event file"
