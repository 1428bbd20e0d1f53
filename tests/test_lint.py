"""The tree is ruff-clean (lint and format), with the configuration in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_clean(args: list[str]) -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    result = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Built from two halves so that this file does not cite it itself.
_SPEC_NAME = "GLM_" + "SPEC"
_DOC_TREES = ("megatron_glm/", "tools/", "tests/", "benchmarks/", "docs/", "examples/")


def _checked_files() -> list[str]:
    """Files of the repository that ship: the package, tools, tests, benchmarks, docs, examples and
    the top-level ``*.py``/``*.md``. Tracked files plus new, not yet committed ones (not ignored),
    so a leftover shows up before it is committed."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(
        {
            path
            for path in listed.split("\0")
            if path.startswith(_DOC_TREES) or ("/" not in path and path.endswith((".py", ".md")))
        }
    )


def test_no_file_cites_the_external_spec() -> None:
    """The normative GLM contract lives outside the repository; code and docs must cite the
    project's own pages instead (docs/model.md, docs/blank-infilling.md, docs/data-formats.md,
    docs/checkpoints.md, docs/training.md), so every reference can be followed from a checkout."""
    offenders = []
    for path in _checked_files():
        file = ROOT / path
        if not file.is_file():  # deleted in the working tree, not yet committed
            continue
        for number, line in enumerate(file.read_bytes().splitlines(), start=1):
            if _SPEC_NAME.encode() in line:
                offenders.append(f"{path}:{number}: {line.decode(errors='replace').strip()}")
    assert not offenders, (
        f"{len(offenders)} line(s) cite {_SPEC_NAME}; cite the docs/ page that states it:\n"
        + "\n".join(offenders)
    )
