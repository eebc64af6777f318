"""Fixtures of the benchmark tests: a tiny random Llama saved with transformers, as a HF folder (with a
byte-level tokenizer, so that real text tokenizes) and as a GGUF."""

from __future__ import annotations

import pytest

from tests.helpers import byte_level_metadata, save_tiny_hf, tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    from loom.tokenizer import tokenizer_from_gguf_metadata

    folder = str(tmp_path_factory.mktemp("tiny-hf"))
    save_tiny_hf(folder, "llama", num_key_value_heads=2)
    tokenizer_from_gguf_metadata(byte_level_metadata()).save(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return tiny_llama_gguf(tmp_path_factory.mktemp("tiny-gguf"))
