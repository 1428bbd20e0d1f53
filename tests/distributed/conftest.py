"""Fixtures of the multi-process trainer tests (test_layouts.py, test_resume.py)."""

from __future__ import annotations

import pytest

from tests.training.helpers import Corpus, build_corpus


@pytest.fixture(scope="session")
def glm_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The tiny corpus of tests/training/helpers.py (one build per session, shared)."""
    return build_corpus(tmp_path_factory.getbasetemp() / "glm_corpus")
