"""A real architecture with random weights, saved as a Hugging Face folder: for measuring speed where the
real checkpoint is not at hand (speed does not depend on weight values) and for checking loom against
HF transformers on the very same weights.

``save_random_llama(folder)`` writes HF's ``LlamaForCausalLM`` with SmolLM2-135M's exact configuration,
initialized by transformers itself from a fixed seed, plus a tokenizer if one is given (loom needs a
tokenizer.json to load a folder).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

SMOLLM2_135M: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def save_random_llama(folder: str, seed: int = 0, tokenizer_dir: str | None = None, **overrides: Any) -> str:
    """Write a random-weight Llama (SmolLM2-135M's config unless overridden) to ``folder`` (fp32
    safetensors); copy the tokenizer files found in ``tokenizer_dir``. Returns ``folder``."""
    import transformers

    config = transformers.LlamaConfig(**{**SMOLLM2_135M, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            path = os.path.join(tokenizer_dir, name)
            if os.path.exists(path):
                shutil.copy(path, os.path.join(folder, name))
    return folder
