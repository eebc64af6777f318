"""Fixtures shared by the CLI tests: a tiny random Llama GGUF (quantize and prune write checkpoints of it)."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny"))
