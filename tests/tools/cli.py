"""Run the repository's command-line tools (``tools/*.py``) the way a user does, for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_tool(script: str, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``python script args`` from the repository root with one intra-op thread (the suite shares
    few cores); returns the finished process with its text output, whatever its exit code."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_tool(script: str, *args: str, timeout: float = 300.0) -> None:
    """``run_tool`` that raises ``RuntimeError`` with the tool's output when it fails."""
    done = run_tool(script, *args, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


def preprocess_jsonl(
    jsonl: Path, prefix: Path, tokenizer_args: Sequence[str], *, eod: bool = True
) -> str:
    """``tools/preprocess_data.py`` on one jsonl file as a user runs it (one worker, no progress
    bar); returns the dataset prefix ``{prefix}_text_document``."""
    check_tool(
        "tools/preprocess_data.py",
        "--input",
        str(jsonl),
        "--output-prefix",
        str(prefix),
        "--workers",
        "1",
        "--no-progress",
        *tokenizer_args,
        *(["--append-eod"] if eod else []),
    )
    return f"{prefix}_text_document"
