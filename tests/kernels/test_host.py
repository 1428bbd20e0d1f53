"""keep_freed_memory: applied on glibc, idempotent, and off with MEGATRON_GLM_KEEP_FREED_MEMORY=0.
Run in subprocesses so the test process keeps its own allocator settings."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from megatron_glm.kernels.host import ENV_VAR

_CODE = "from megatron_glm.kernels.host import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_value is not None:
        env[ENV_VAR] = env_value
    done = subprocess.run(
        [sys.executable, "-c", _CODE], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_applied_on_glibc_and_idempotent() -> None:
    assert _run(None) == "True True"


def test_turned_off_by_the_environment() -> None:
    assert _run("0") == "False False"
