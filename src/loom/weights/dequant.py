"""GGML block formats -> float32 tensors, in torch.

Each function takes the raw bytes of a tensor as a uint8 tensor [n_blocks, block_bytes] and
returns float32 [n_blocks, block_elements], computing exactly what ggml's
``dequantize_row_*`` computes (same operations in the same order, so the results equal the
``gguf`` package's reference dequantizers bit for bit; tests check every type).

Layouts (ggml-common.h), "d" and "m"/"dmin" are fp16 scales:
  Q4_0  d, 16B nibbles                   w = d * (q - 8)
  Q4_1  d, m, 16B nibbles                w = d * q + m
  Q5_0  d, 4B high bits, 16B nibbles     w = d * (q - 16)
  Q5_1  d, m, 4B high bits, 16B nibbles  w = d * q + m
  Q8_0  d, 32 int8                       w = d * q
  Q2_K  16B 4-bit scale|min, 64B 2-bit q, d, dmin         w = d sc q - dmin m  (16 x 16)
  Q3_K  32B high-bit mask, 64B 2-bit q, 12B 6-bit scales, d    w = d (sc - 32) q  (16 x 16)
  Q4_K  d, dmin, 12B 6-bit scales|mins, 128B nibbles      w = d sc q - dmin m  (8 x 32)
  Q5_K  d, dmin, 12B scales|mins, 32B high bits, 128B nibbles                  (8 x 32)
  Q6_K  128B low nibbles, 64B 2-bit highs, 16 int8 scales, d   w = d sc (q - 32)  (16 x 16)
In 32-element blocks the low nibbles of byte j are element j and the high nibbles element j + 16.
"""

from __future__ import annotations

from typing import Callable

import torch

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

U8 = torch.uint8


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] packed bytes -> [n, 32] values 0..15 (low nibbles first)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits_le32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] little-endian uint32 -> [n, 32] bits, bit j for element j."""
    shifts = torch.arange(8, dtype=U8)
    bits = (qh[:, :, None] >> shifts) & 1  # [n, 4 bytes, 8 bits]
    return bits.reshape(qh.shape[0], 32)


def q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | (_bits_le32(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | (_bits_le32(b[:, 4:8]) << 4)
    return d * q.float() + m


def q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """K-quant 2-bit planes: [n, 64] bytes -> [n, 2 halves, 4 shifts, 32] values 0..3."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=U8).view(1, 1, 4, 1)
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _crumbs(qs).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low nibbles in bytes 0-7, 2-bit highs in bytes 8-11."""
    n = s.shape[0]
    low = torch.cat((s[:, :8] & 0x0F, s[:, :8] >> 4), dim=-1)  # scale i: byte i % 8, nibble i // 8
    high = (s[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=U8).view(1, 4, 1)) & 3
    high = high.reshape(n, 16)  # scale i: byte 8 + i % 4, bits 2 (i // 4)
    return (low | (high << 4)).to(torch.int8) - 32


def q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    dl = (d * _q3_k_scales(scales).float()).reshape(n, 16, 1)
    low = _crumbs(qs).reshape(n, 16, 16)
    # Element (half h, shift j, l) takes bit 4h + j of hmask[l]; a clear bit subtracts 4.
    hbits = (hmask.reshape(n, 1, 32) >> torch.arange(8, dtype=U8).view(1, 8, 1)) & 1
    hbits = hbits.reshape(n, 16, 16)
    q = low.to(torch.int8) - ((hbits ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).reshape(n, 256)


def _k4_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((a & 63, (c & 0x0F) | ((a >> 6) << 4)), dim=-1)
    mn = torch.cat((b & 63, (c >> 4) | ((b >> 6) << 4)), dim=-1)
    return sc, mn


def q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k4_scale_min(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)
    q = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32).float()  # sub-block 2c + s
    return ((d * sc.float()).reshape(n, 8, 1) * q - (dmin * mn.float()).reshape(n, 8, 1)).reshape(n, 256)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k4_scale_min(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(n, 4, 32)
    low = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(n, 8, 32)
    high = (qh.reshape(n, 1, 32) >> torch.arange(8, dtype=U8).view(1, 8, 1)) & 1  # sub-block k: bit k
    q = (low | (high << 4)).float()
    return ((d * sc.float()).reshape(n, 8, 1) * q - (dmin * mn.float()).reshape(n, 8, 1)).reshape(n, 256)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    # Per half h: quarter k takes nibble k // 2 of ql[h, k % 2] and bits 2k of qh[h].
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)  # [n, 2, 4, 32]
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=U8).view(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).to(torch.int8) - 32
    return ((d * scales).reshape(n, 16, 1) * q.reshape(n, 16, 16).float()).reshape(n, 256)


def f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


DEQUANTIZERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: f32, Q.F16: f16, Q.BF16: bf16,
    Q.Q4_0: q4_0, Q.Q4_1: q4_1, Q.Q5_0: q5_0, Q.Q5_1: q5_1, Q.Q8_0: q8_0,
    Q.Q2_K: q2_k, Q.Q3_K: q3_k, Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k,
}


def block_geometry(qtype: Q) -> tuple[int, int]:
    """(elements per block, bytes per block)."""
    return GGML_QUANT_SIZES[qtype]


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8, any shape) of a tensor in format ``qtype`` -> float32 tensor of ``shape``."""
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        raise NotImplementedError(f"dequantization of {qtype.name} is not supported")
    elems, nbytes = block_geometry(qtype)
    blocks = raw.reshape(-1, nbytes)
    out = fn(blocks)
    return out.reshape(shape)
