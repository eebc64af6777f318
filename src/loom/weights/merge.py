"""``loom merge``: a base model with a LoRA adapter merged in, written as a dense Hugging Face folder that
every loom command and transformers load (W' = W + s B A, ``weights/lora.py``)."""

from __future__ import annotations

import os

from loom.tokenizer import load_tokenizer
from loom.weights.loader import load_model
from loom.weights.quantized_checkpoint import save_checkpoint


def merge_lora(model: str | os.PathLike[str], adapter: str | os.PathLike[str], out: str | os.PathLike[str],
               with_tokenizer: bool = True) -> str:
    """Write ``model`` (a GGUF file or an HF folder) with ``adapter`` merged into ``out`` as fp32
    safetensors, its config.json and (``with_tokenizer``) its tokenizer; returns ``out``."""
    loaded = load_model(model, weights="fp32", lora=adapter)
    tokenizer = load_tokenizer(os.fspath(model), loaded.metadata, loaded.config.eos_token_ids) if with_tokenizer else None
    save_checkpoint(loaded.model, os.fspath(out), tokenizer=tokenizer)
    return os.fspath(out)
