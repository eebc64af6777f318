"""GGUF blocks kept quantized: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K tensors as ``QuantizedTensor``s, exactly.

Every block maps onto groups of the portable form (w = q scale + offset):
  Q4_0  w = d (q - 8)                  ->  4-bit codes q, groups of 32, scale d, offset -8 d
  Q4_1  w = d q + m                    ->  4-bit codes q, groups of 32, scale d, offset m
  Q5_0  w = d (q - 16), q 5-bit        ->  5-bit codes q, groups of 32, scale d, offset -16 d
  Q5_1  w = d q + m, q 5-bit           ->  5-bit codes q, groups of 32, scale d, offset m
  Q8_0  w = d q (int8)                 ->  8-bit codes q + 128, groups of 32, scale d, offset -128 d
  Q4_K  w = d sc_j q - dmin m_j        ->  4-bit codes q, groups of 32 (sub-block j), scale d sc_j,
        (6-bit sc_j, m_j per 32)           offset -dmin m_j
  Q6_K  w = d sc_j (q - 32), q 6-bit   ->  8-bit codes q + 96, groups of 16 (sub-block j), scale d sc_j,
        (int8 sc_j per 16)                 offset -128 d sc_j
fp16 d, m and dmin are exact in fp32, and so are their products with the 6- or 8-bit sub-block scales
(at most 19 significant bits), so the weights are the file's: the codes are its nibbles or bytes (Q4_0 / Q4_1
in the GGUF block's own int4 layout: byte i = element i | element i + 16 << 4).
"""

from __future__ import annotations

import torch

from gguf.constants import GGMLQuantizationType as Q

from loom.config import ModelConfig
from loom.layers.quantized import QuantizedTensor, unpack_int4
from loom.weights.dequant import _bits_le32, _k4_scale_min, _nibbles
from loom.weights.gguf import GGUF_ARCHITECTURES, GGUFFile, unpermute_rope

NATIVE_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24, Q.Q8_0: 34, Q.Q4_K: 144, Q.Q6_K: 210}
_SUPER = {Q.Q4_K: 256, Q.Q6_K: 256}  # weights per block (32 for the others)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float().squeeze(-1)


def gguf_quantized(g: GGUFFile, config: ModelConfig, name: str) -> QuantizedTensor | None:
    """The tensor ``name`` in portable quantized form (HF row order), or None if its type has no
    native form (the caller dequantizes it instead)."""
    info = g.info(name)
    if info.qtype not in NATIVE_TYPES or len(info.shape) != 2:
        return None
    n, k = info.shape
    per_block = _SUPER.get(info.qtype, 32)
    blocks = g.raw(name).view(n, k // per_block, _BLOCK_BYTES[info.qtype])
    d = _f16(blocks[..., 0:2])
    if info.qtype in (Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K):
        qt = _k_or_5bit(info.qtype, blocks.reshape(-1, _BLOCK_BYTES[info.qtype]), n, k)
    elif info.qtype == Q.Q8_0:
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


def _k_or_5bit(qtype: Q, b: torch.Tensor, n: int, k: int) -> QuantizedTensor:
    """Q5_0, Q5_1, Q4_K or Q6_K blocks b [blocks, bytes] (rows of n x k weights) in portable form (module doc)."""
    f16 = lambda x: x.contiguous().view(torch.float16).float()  # noqa: E731  [blocks, 2] -> [blocks, 1]
    if qtype in (Q.Q5_0, Q.Q5_1):
        d = f16(b[:, :2])
        start = 2 if qtype == Q.Q5_0 else 4  # Q5_1: d, m, qh, qs
        codes = _nibbles(b[:, start + 4:]) | (_bits_le32(b[:, start:start + 4]) << 4)
        offset = -16.0 * d if qtype == Q.Q5_0 else f16(b[:, 2:4])
        return QuantizedTensor(codes.reshape(n, k), d.reshape(n, k // 32), offset.reshape(n, k // 32), 5, 32)
    m = b.shape[0]
    if qtype == Q.Q4_K:
        d, dmin = f16(b[:, :2]), f16(b[:, 2:4])
        sc, mn = _k4_scale_min(b[:, 4:16])
        qs = b[:, 16:144].reshape(m, 4, 32)
        codes = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, k)  # sub-block 2c + s
        scales, offsets = d * sc.float(), -(dmin * mn.float())
        return QuantizedTensor(codes, scales.reshape(n, k // 32), offsets.reshape(n, k // 32), 4, 32)
    ql, qh = b[:, :128].reshape(m, 2, 2, 32), b[:, 128:192].reshape(m, 2, 1, 32)
    sub = b[:, 192:208].contiguous().view(torch.int8).float()
    d = f16(b[:, 208:210])
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)  # half h, quarter j: nibble j // 2 of ql[h, j % 2]
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    codes = ((low | (high << 4)) + 96).reshape(n, k)
    scales = (d * sub).reshape(n, k // 16)
    return QuantizedTensor(codes, scales, -128.0 * scales, 8, 16)
