"""GPU tests (run on a CUDA machine: ``python -m pytest tests_cuda``; CI, which has no GPU, never collects
them). The model is HF's LlamaForCausalLM with SmolLM2-135M's configuration and seeded random weights,
built once per session (or read from LOOM_CUDA_MODEL_DIR); LOOM_CUDA_TOKENIZER names a folder with a
tokenizer.json (SmolLM2's), else a byte-level tokenizer is used."""

from __future__ import annotations

import os

import pytest
import torch

from loom.config import CacheConfig


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="tests_cuda needs a CUDA GPU")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from loom.bench.random_model import save_random_llama

    given = os.environ.get("LOOM_CUDA_MODEL_DIR")
    if given and os.path.exists(os.path.join(given, "config.json")):
        return given
    folder = str(tmp_path_factory.mktemp("smollm2-random"))
    tok = os.environ.get("LOOM_CUDA_TOKENIZER")
    save_random_llama(folder, seed=0, tokenizer_dir=tok)
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        from loom.tokenizer import tokenizer_from_gguf_metadata
        from tests.helpers import byte_level_metadata

        tokenizer_from_gguf_metadata(byte_level_metadata()).save(folder)
    return folder


@pytest.fixture(scope="session")
def hf32(smol_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval().to("cuda")


def _llm(folder: str, **kwargs):
    from loom import LLM

    return LLM(folder, device="cuda", cache=CacheConfig(memory_bytes=2 << 30), **kwargs)


@pytest.fixture(scope="session")
def llm32(smol_dir: str):
    return _llm(smol_dir, weights="fp32")


@pytest.fixture(scope="session")
def llm16(smol_dir: str):
    return _llm(smol_dir)  # the CUDA default: bf16


@pytest.fixture
def fresh_llm(smol_dir: str):
    """A new engine per test (for tests that change engine settings)."""
    return lambda **kwargs: _llm(smol_dir, **kwargs)
