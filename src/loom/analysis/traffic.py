"""Bytes a decode step must move: the numerator of "fraction of the memory-bandwidth limit".

At batch 1 every weight matrix is read once per token (a GEMV), and attention reads the whole KV
cache; activations are tiny. The embedding table is not read (one row is looked up) unless it
doubles as the output layer, where it is read in full.
"""

from __future__ import annotations

import torch

from loom.config import ModelConfig
from loom.models.transformer import Transformer


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of every weight a decode step reads; quantized linears count what their kernel reads
    (codes, scales, offsets)."""
    total = 0
    # a lookup table reads one row per token: not a weight stream (a tied one is counted as the output layer)
    quantized = {name: m for name, m in model.named_modules()
                 if hasattr(m, "weight_bytes") and not name.startswith("embed_tokens")}
    for name, m in quantized.items():
        total += m.weight_bytes()  # type: ignore[operator]
    for name, p in model.named_parameters():
        if name.startswith(("embed_tokens", "pos_embed")) or name.rpartition(".")[0] in quantized:
            continue
        total += p.numel() * p.element_size()
    for name, m in quantized.items():
        if getattr(m, "bias", None) is not None:
            total += m.bias.numel() * m.bias.element_size()
    if model.lm_head is None:  # tied: the embedding is read as the output layer
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def dense_weight_bytes_per_token(config: ModelConfig, element_size: int) -> int:
    """Weight bytes a dense model of ``config`` reads per decode step (embedding read only as the output
    layer): what a dense peer such as HF transformers moves for the same architecture."""
    c = config
    mlp = (3 if c.gated_mlp else 2) * c.hidden_size * c.intermediate_size
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    per_layer = attn + mlp + 2 * c.hidden_size
    return element_size * (c.num_layers * per_layer + c.hidden_size + c.vocab_size * c.hidden_size)


def decode_bytes_per_token(model: Transformer, context_len: float, kv_bytes_per_element: int | None = None) -> float:
    """Weights + KV cache read for one decode step at ``context_len`` tokens of context."""
    element = kv_bytes_per_element or torch.empty(0, dtype=model.dtype).element_size()
    return weight_bytes_per_token(model) + context_len * model.config.kv_bytes_per_token(element)
