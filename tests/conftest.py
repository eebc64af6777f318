"""Shared fixtures: the real default model, its HF reference copy, and tiny random HF models."""

from __future__ import annotations

import os

import pytest
import torch

from loom.default_model import default_model_path

torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm_hf_dir(smollm_path: str) -> str:
    """fp32 HF checkpoint that transformers itself made from the GGUF (cached across runs)."""
    from loom.bench.peers import hf_reference_copy

    return hf_reference_copy(smollm_path)


@pytest.fixture(scope="session")
def smollm_hf(smollm_hf_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_hf_tokenizer(smollm_hf_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_hf_dir)


@pytest.fixture(scope="session")
def smollm(smollm_path: str):
    """The default model dequantized to fp32: the reference every exactness test compares with HF."""
    from loom import LLM

    return LLM(smollm_path, weights="fp32")


@pytest.fixture(scope="session")
def smollm_native(smollm_path: str):
    """The default model as it runs by default: Q4_1 / Q8_0 weights on the quantized kernels."""
    from loom import LLM

    return LLM(smollm_path)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
