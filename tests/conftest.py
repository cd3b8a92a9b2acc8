"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import pytest
from cli_fixture import make_inputs


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """A tiny GPT-2 folder with its own tokenizer, a corpus and queries, on disk (read-only for tests)."""
    return make_inputs(tmp_path_factory.mktemp("inputs"))
