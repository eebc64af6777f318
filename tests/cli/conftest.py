"""Fixtures shared by the CLI tests: a tiny random Llama GGUF (quantize and prune write checkpoints of it)."""

from __future__ import annotations

import pytest

from tests.helpers import byte_level_vocab_meta, save_tiny_hf, write_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_hf(str(folder / "hf"), "llama", num_key_value_heads=2)
    path = str(folder / "tiny.gguf")
    write_llama_gguf(path, hf, "F32", tokenizer_meta=byte_level_vocab_meta())
    return path
