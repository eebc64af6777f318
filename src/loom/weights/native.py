"""GGUF blocks kept quantized: Q4_0, Q4_1 and Q8_0 tensors as ``QuantizedTensor``s, bit for bit.

Every block of 32 weights maps onto one group of the portable form (w = q scale + offset):
  Q4_0  w = d (q - 8)   ->  codes q, scale d, offset -8 d
  Q4_1  w = d q + m     ->  codes q, scale d, offset m
  Q8_0  w = d q (int8)  ->  codes q + 128, scale d, offset -128 d
The fp16 d and m are exact in fp32, so nothing is rounded: the codes are the file's nibbles or bytes
and loom's int4 layout is the GGUF block's own (byte i = element i | element i + 16 << 4).
"""

from __future__ import annotations

import torch

from gguf.constants import GGMLQuantizationType as Q

from loom.config import ModelConfig
from loom.layers.quantized import QuantizedTensor, unpack_int4
from loom.weights.gguf import GGUF_ARCHITECTURES, GGUFFile, unpermute_rope

NATIVE_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0)
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def gguf_quantized(g: GGUFFile, config: ModelConfig, name: str) -> QuantizedTensor | None:
    """The tensor ``name`` in portable quantized form (HF row order), or None if its type has no
    native form (the caller dequantizes it instead)."""
    info = g.info(name)
    if info.qtype not in NATIVE_TYPES or len(info.shape) != 2:
        return None
    n, k = info.shape
    blocks = g.raw(name).view(n, k // 32, _BLOCK_BYTES[info.qtype])
    d = _f16(blocks[..., 0:2])
    if info.qtype == Q.Q8_0:
        codes = (blocks[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        qt = QuantizedTensor(codes.reshape(n, k), d, -128.0 * d, 8, 32)
    else:
        start = 2 if info.qtype == Q.Q4_0 else 4
        offset = -8.0 * d if info.qtype == Q.Q4_0 else _f16(blocks[..., 2:4])
        codes = unpack_int4(blocks[..., start:].reshape(n, k // 2).contiguous())
        qt = QuantizedTensor(codes, d, offset, 4, 32)
    if GGUF_ARCHITECTURES[config.architecture]["permuted"]:
        heads = config.num_heads if name.endswith("attn_q.weight") else \
            config.num_kv_heads if name.endswith("attn_k.weight") else 0
        if heads:
            qt = QuantizedTensor(unpermute_rope(qt.codes, heads), unpermute_rope(qt.scales, heads),
                                 unpermute_rope(qt.offsets, heads), qt.bits, qt.group_size)
    return qt
