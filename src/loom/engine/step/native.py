"""The native decode step: the whole forward of a small decode batch in C++ (native/decode_step.cpp).

One OpenMP parallel region per step, with barriers between dependent stages, instead of one
interpreter visit, allocation and thread start per op; bias, RoPE and the cache write are one pass
and the residual adds happen in the GEMVs' stores. At batch 1 on SmolLM2 it takes 10.4 ms per token
where the scripted step takes 13.8 (4-bit native weights) and 29 ms where it takes 36 (fp32).

With multi-LoRA pools (layers/multi_lora.py: one ``LayerLora`` per decoder layer) each row of a batch
adds its own adapter's product to the four linears of every layer (``DecodeBatch.lora_slots``), inside the
same parallel region: a shrink stage before each linear and the expand in the linear's own stores.
"""

from __future__ import annotations

import torch

from loom.engine.step.base import DecodeBatch, DecodeStep
from loom.engine.step.weights import DecoderWeights
from loom.layers import fused
from loom.layers.linear_spec import LinearKind, LinearSpec
from loom.layers.multi_lora import LayerLora
from loom.models.transformer import Transformer

# The largest batch the native step takes (measured on SmolLM2, 2 cores: the native step is 1.2-1.6x
# faster than the scripted one up to 32 sequences with loom-quantized weights, and with dense fp32
# weights only at batch 1, where MKL's GEMM wins as soon as there are rows to block over). Larger
# batches take the scripted step, whose linears hand many-row products to BLAS (apply_linear).
MAX_BATCH_QUANTIZED = 32
MAX_BATCH_DENSE = 1


def native_problem(weights: DecoderWeights) -> str | None:
    """Why the native step cannot run this model (None: it can)."""
    if not fused.native_ops():
        return "loom's native kernels are not built (LOOM_NATIVE=0, or no compiler)"
    if weights.dtype != torch.float32:
        return f"it runs fp32 models, not {str(weights.dtype).replace('torch.', '')}"
    if weights.moe:
        return "it has no mixture-of-experts layers (the scripted step runs them)"
    kinds = {spec.kind for spec in weights.linears()}
    if not kinds <= {LinearKind.DENSE, LinearKind.LOOM}:
        return f"it takes dense fp32 or loom int4 / int8 linears, not {sorted(k.name for k in kinds)}"
    if weights.rotation.numel() > 0:
        return "it does not rotate the residual stream (models/rotation.py)"
    return None


class NativeStep(DecodeStep):
    """Decode batches of up to ``max_batch`` rows through ``torch.classes.loom.NativeDecoder``."""

    name = "native"

    def __init__(self, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 weights: DecoderWeights | None = None, lora: list[LayerLora] | None = None) -> None:
        """``lora``: each decoder layer's adapter pools (held, not copied: adapters loaded into them in
        place later are used by the next step), or None for a step without LoRA."""
        weights = weights or DecoderWeights.of(model)
        problem = native_problem(weights)
        if problem is not None:
            raise ValueError(f"the native decode step cannot run this model: {problem}")
        self.plain_weights = weights
        self.rotary = model.rotary
        self.local_rotary = model.local_rotary if weights.extras is not None else None
        self.dtype = model.dtype
        self.max_batch = MAX_BATCH_DENSE if weights.dense_layers else MAX_BATCH_QUANTIZED
        s = weights.shape
        self.decoder = torch.classes.loom.NativeDecoder(weights.embed, weights.final_norm, s.num_heads,
                                                        s.num_kv_heads, s.head_dim, s.eps, s.scale)
        _add_linear(self.decoder.set_head, weights.head)
        for i, layer in enumerate(weights.layers):
            self.decoder.add_layer(layer.attn_norm, layer.mlp_norm, layer.qkv_bias, k_cache[i], v_cache[i],
                                   s.windows[i])
            if weights.extras is not None:
                self.decoder.set_layer_extras(*weights.extras[i])
            for spec in (layer.qkv, layer.o, layer.gate_up, layer.down):
                _add_linear(self.decoder.add_linear, spec)
        self.decoder.set_options(weights.embedding_scale, 1 if weights.activation == "gelu_tanh" else 0)
        self.lora = lora
        if lora is not None:
            if len(lora) != len(weights.layers):
                raise ValueError(f"LoRA pools for {len(lora)} layers, but the model has {len(weights.layers)}")
            for i, pools in enumerate(lora):
                for j, w in enumerate((pools.qkv, pools.o, pools.gate_up, pools.down)):
                    self.decoder.set_lora(i, j, w.a, w.b, list(w.cols))
        self._no_lora = torch.empty(0, dtype=torch.long)

    def supports(self, batch: DecodeBatch) -> bool:
        if batch.lora_slots is not None and self.lora is None:
            return False  # built without adapter pools: the rows' adapters would be dropped
        return batch.size <= self.max_batch

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        cos, sin = self.rotary.prepare(batch.positions, self.dtype)
        if self.local_rotary is not None:  # [2, B, D]: the global table, then the sliding-window layers'
            local_cos, local_sin = self.local_rotary.prepare(batch.positions, self.dtype)
            cos, sin = torch.stack((cos, local_cos)), torch.stack((sin, local_sin))
        lora_slots = self._no_lora if batch.lora_slots is None else batch.lora_slots
        tokens = batch.tokens
        if self.plain_weights.lookup is not None:  # a quantized embedding: this batch's rows as the table
            tokens, table = self.plain_weights.embedding_rows(tokens)
            self.decoder.set_embedding(table.float())
        return self.decoder.step(tokens, batch.slots, batch.block_tables, batch.context_lens, cos, sin, lora_slots)

    def describe(self) -> str:
        return f"native (decode batches of <= {self.max_batch})"


def _add_linear(add, spec: LinearSpec) -> None:  # type: ignore[no-untyped-def]
    """Hand one linear to the decoder: dense [W] or loom's codes, scales and offsets."""
    empty = torch.empty(0)
    t = spec.tensors
    extra = (t[1], t[2]) if spec.kind == LinearKind.LOOM else (empty, empty)
    add(t[0], *extra, spec.bits, spec.group)
