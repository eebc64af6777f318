"""NF4 quantization (QLoRA, Dettmers et al. 2023, section 3): 4-bit NormalFloat codes per block of 64, with
double-quantized block scales. The format, the code book and the layer are in loom.layers.nf4.

Block-wise absmax quantization (the paper's eq. 1-2 with the NF4 code book in place of the int grid):

    c1[b] = max_{j in b} |w_j|,    code_j = argmin_i |NF4_i - w_j / c1[b]|,    w_hat_j = NF4[code_j] c1[b]

The code is the NEAREST of the 16 values to w / c1 (computed in fp32); a value exactly halfway between two
codes takes the lower index. A block of zeros (c1 = 0) gets code 7 (the exact 0) and dequantizes to zeros.
The tensor is flattened row-major; a last partial block is padded with zeros, which do not change its absmax.

Double quantization (section 3, "Double Quantization"): the fp32 c1 values are quantized again, to 8 bits in
blocks of 256. Since they are all positive, their mean is subtracted first (so a symmetric code uses its
range); then per block c2 = max |c1 - mean| (fp32) and code2 = round(127 (c1 - mean) / c2), int8 in
-127..127. (The paper uses 8-bit floats for this second level; a linear int8 grid is used here: the error it
adds to a scale is at most c2 / 254, i.e. well under 1% of the scale for weights whose absmax values do not
spread over orders of magnitude.) The codes of w are chosen with the exact fp32 c1, the stored scale is the
double-quantized one, as in the paper.
"""

from __future__ import annotations

import torch

from loom.layers.nf4 import (INT8_MAX, NF4_CODE_BOOK, NF4_ZERO_CODE, NF4Linear, NF4Tensor, QuantizedAbsmax,
                             pack_nibbles)

__all__ = ["nearest_nf4", "quantize_absmax", "quantize_nf4", "nf4_linear"]


def nearest_nf4(x: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest NF4 value to each element of ``x`` (fp32, in [-1, 1]); ties -> lower index.

    Equal to argmin_i |NF4_i - x| over the fp32 distances (first minimum), without the [.., 16] distance
    tensor: the two neighbours of x in the sorted code book are the only candidates.
    """
    book = NF4_CODE_BOOK.to(x.device)
    upper = torch.searchsorted(book, x).clamp(1, len(book) - 1)  # first value >= x: book[upper - 1] < x <= book[upper]
    lower = upper - 1
    take_upper = (book[upper] - x).abs() < (x - book[lower]).abs()
    return torch.where(take_upper, upper, lower)


def quantize_absmax(absmax: torch.Tensor, block_size: int = 256) -> QuantizedAbsmax:
    """Double quantization of the fp32 block scales ``absmax`` [n]: mean removed, int8 per block of 256."""
    a = absmax.float().reshape(-1)
    mean = a.mean()
    centered = a - mean
    pad = (-a.numel()) % block_size
    blocks = torch.cat([centered, centered.new_zeros(pad)]).view(-1, block_size)
    c2 = blocks.abs().amax(dim=1)
    step = torch.where(c2 > 0, c2 / INT8_MAX, torch.ones_like(c2))
    codes = torch.round(blocks / step[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return QuantizedAbsmax(codes.reshape(-1)[: a.numel()].contiguous(), c2.contiguous(), mean, block_size)


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = True,
                 scale_block_size: int = 256) -> NF4Tensor:
    """``w`` (any shape, any float dtype) in NF4: blocks of ``block_size`` consecutive values (row-major),
    absmax-scaled, nearest code, optionally double-quantized scales (blocks of ``scale_block_size``)."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"the NF4 block size must be even and positive, got {block_size}")
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_nf4(blocks / safe[:, None])
    codes = torch.where(absmax[:, None] > 0, codes, torch.full_like(codes, NF4_ZERO_CODE))
    scales: torch.Tensor | QuantizedAbsmax = quantize_absmax(absmax, scale_block_size) if double_quant else absmax
    return NF4Tensor(pack_nibbles(codes.reshape(-1)), scales, w.shape, w.dtype, block_size)


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = 64,
               double_quant: bool = True) -> NF4Linear:
    """A frozen ``NF4Linear`` from a dense weight [out, in] (and bias): the QLoRA base layer."""
    return NF4Linear(quantize_nf4(weight, block_size, double_quant), bias)
