"""Bytes a decode step must move: the numerator of "fraction of the memory-bandwidth limit".

At batch 1 every weight matrix is read once per token (a GEMV), and attention reads the whole KV
cache; activations are tiny. The embedding table is not read (one row is looked up) unless it
doubles as the output layer, where it is read in full.
"""

from __future__ import annotations

from loom.models.transformer import Transformer


def weight_bytes_per_token(model: Transformer) -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(("embed_tokens", "pos_embed")):
            continue
        total += p.numel() * p.element_size()
    if model.lm_head is None:  # tied: the embedding is read as the output layer
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def decode_bytes_per_token(model: Transformer, context_len: float, kv_bytes_per_element: int | None = None) -> float:
    """Weights + KV cache read for one decode step at ``context_len`` tokens of context."""
    element = kv_bytes_per_element or model.embed_tokens.weight.element_size()
    return weight_bytes_per_token(model) + context_len * model.config.kv_bytes_per_token(element)
