"""Fixtures of the trainer tests: the tiny corpus (built once per session, shared with
tests/distributed through the session's base temp directory)."""

from __future__ import annotations

import pytest

from tests.training.helpers import Corpus, build_corpus


@pytest.fixture(scope="session")
def glm_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.getbasetemp() / "glm_corpus")
