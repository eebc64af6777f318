"""The module step: the model's own ``nn.Module`` forward (models/transformer.py), for every batch.

It is the general path and the definition the compiled steps are tested against: any architecture
the ModelConfig describes, any linear format, the int8 KV cache, bounded (evicting) KV, and every
batch that is not decode-only (prefill chunks mixed with decodes). The runner also runs those mixed
batches through ``forward``.
"""

from __future__ import annotations

import torch

from loom.engine.step.base import DecodeBatch, DecodeStep
from loom.layers.attention import AttentionMetadata
from loom.layers.multi_lora import LoraHooks
from loom.models.transformer import KVCaches, Transformer


class ModuleStep(DecodeStep):
    name = "module"

    def __init__(self, model: Transformer, caches: KVCaches, lora: LoraHooks | None = None) -> None:
        """``lora``: the hooks that add per-row adapter products to the linears (engine/adapters.py)."""
        self.model = model
        self.caches = caches  # per layer: (K, V) views of the paged cache, or Int8LayerKV
        self.device = model.device
        self.lora = lora

    def supports(self, batch: DecodeBatch) -> bool:
        return batch.lora_slots is None or self.lora is not None

    def forward(self, ids: torch.Tensor, meta: AttentionMetadata, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of any shape (prefill chunks and decodes); ``lora_slots``
        [T]: each token's adapter slot (-1: none), or None for the base model throughout."""
        if lora_slots is None or self.lora is None:
            if lora_slots is not None:
                raise ValueError("a batch names adapter slots but the module step has no adapters")
            return self.model(ids.to(self.device), meta.to(self.device), self.caches)
        with self.lora.using(lora_slots):
            return self.model(ids.to(self.device), meta.to(self.device), self.caches)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).float()

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        b = batch.size
        meta = AttentionMetadata(batch.positions, list(range(b + 1)), batch.context_lens.tolist(), batch.slots,
                                 batch.block_tables)
        return self.logits(self.forward(batch.tokens, meta, batch.lora_slots))
