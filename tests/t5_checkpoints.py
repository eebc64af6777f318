"""Tiny random T5 / mT5 checkpoints saved by transformers, for the T5 tests (models, weights, engine).

``save_tiny_t5`` builds a ``T5ForConditionalGeneration`` (or mT5) from a config, draws weights large enough that a
tiny model's greedy tokens vary (std 0.4 for the matrices, 1 for the relative position tables, the norms perturbed),
saves it, and returns the model transformers loads back from the folder: the reference for that folder.

Untied checkpoints are written as the Flan-T5 / mT5 files on the hub are (transformers 4's layout): config.json with
``tie_word_embeddings: false`` and an ``lm_head.weight`` of their own; ``untied_v5`` keeps what transformers 5 writes
for a model configured untied (``scale_decoder_outputs: false``, no ``lm_head.weight``: the head is the embedding).
"""

from __future__ import annotations

import json
import os

import torch

VOCAB = 256  # the byte-level test tokenizer's


def save_tiny_t5(folder: str, feed_forward: str = "gated-gelu", tied: bool = True, seed: int = 0,
                 encoder_layers: int = 2, decoder_layers: int = 2, model_type: str = "t5", untied_v5: bool = False,
                 std: float = 0.4, **overrides):
    """Save a tiny random checkpoint in ``folder``; returns transformers' model loaded from it (fp32, eval)."""
    import transformers
    from safetensors.torch import load_file, save_file

    kwargs = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=encoder_layers,
                  num_decoder_layers=decoder_layers, num_heads=4, feed_forward_proj=feed_forward,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1, tie_word_embeddings=tied and not untied_v5)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    cls = transformers.MT5ForConditionalGeneration if model_type == "mt5" else transformers.T5ForConditionalGeneration
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and name != "shared.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(folder)
    if not tied and not untied_v5:  # the hub's Flan-T5 / mT5 layout: a head of its own
        path = os.path.join(folder, "model.safetensors")
        tensors = load_file(path)
        tensors["lm_head.weight"] = torch.randn(VOCAB, kwargs["d_model"], generator=gen)
        save_file(tensors, path, metadata={"format": "pt"})
        cfg_path = os.path.join(folder, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
    return cls.from_pretrained(folder).eval()


def save_byte_tokenizer(folder: str) -> None:
    from loom.tokenizer import tokenizer_from_gguf_metadata
    from tests.helpers import byte_level_metadata

    tokenizer_from_gguf_metadata(byte_level_metadata()).save(folder)
