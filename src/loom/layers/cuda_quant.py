"""torch's CUDA weight-only kernels, fed from loom's portable ``QuantizedTensor`` (see quantized.py).

int4 group-wise: ``torch.ops.aten._weight_int4pack_mm`` (tinygemm, bf16 tensor cores). Its operands:

  packed  ``_convert_weight_to_int4pack(u8, inner_k_tiles)`` of u8 [N, K/2] where byte i of a row holds
          codes 2i (high nibble) and 2i + 1 (low nibble); the op re-tiles them for mma.m16n8k16
  sz      bf16 [K/g, N, 2]: (scale, zero) of each group, and the kernel computes
          w = (q - 8) * scale + zero (as a bf16 fma), so loom's w = q s + o needs zero = o + 8 s

The CUDA op wants K a multiple of 16 * inner_k_tiles (2, 4 or 8 k-tiles of 16 per 32-bit load),
N a multiple of 8 (its n-tile), groups of 32, 64, 128 or 256, and contiguous bf16 activations.
``int4pack_operands`` builds (u8, sz) as a pure function, so CPU tests can check the layout against
the dequantized weights; ``dequantize_int4pack_operands`` is that check's definition of the format.

int8 per channel: ``_weight_int8pack_mm`` exists on CUDA in some torch builds only; ``int8pack_cuda_dtype``
probes it once (against the formula) and says which activation dtype it takes, if any.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, List, Optional

import torch

if TYPE_CHECKING:
    from loom.layers.quantized import QuantizedTensor

CUDA_INT4_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = (8, 4, 2)  # widest load first


def cuda_int4_problem(qt: QuantizedTensor) -> Optional[str]:
    """Why ``_weight_int4pack_mm`` on CUDA cannot run this format, or None if it can."""
    n = qt.shape[0]
    if qt.bits > 4:
        return f"torch's CUDA int4 kernel holds at most 4 bits, not {qt.bits}"
    if qt.group_size not in CUDA_INT4_GROUPS:
        return f"torch's CUDA int4 kernel takes groups {CUDA_INT4_GROUPS}, not {qt.group_size}"
    if n % 8:
        return f"torch's CUDA int4 kernel needs out features divisible by 8, got {n}"
    return None  # k is a multiple of the group, so of 32: inner_k_tiles finds a packing


def inner_k_tiles(k: int) -> int:
    """The widest k-tile packing (8, 4 or 2 tiles of 16) that divides the input size exactly."""
    for tiles in INNER_K_TILES:
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"in features {k} is not a multiple of 32")


def int4pack_operands(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u8 [N, K/2], sz bf16 [K/g, N, 2]) for ``_convert_weight_to_int4pack`` / ``_weight_int4pack_mm``.

    Byte i of row n is q[n, 2i] << 4 | q[n, 2i + 1]; sz[g, n] = (s[n, g], o[n, g] + 8 s[n, g]).
    Computed on the tensor's own device.
    """
    n, k = qt.shape
    codes = qt.codes.to(torch.uint8).view(n, k // 2, 2)
    u8 = ((codes[:, :, 0] << 4) | codes[:, :, 1]).contiguous()
    zero = qt.offsets.float() + 8.0 * qt.scales.float()
    sz = torch.stack((qt.scales.float(), zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return u8, sz


def dequantize_int4pack_operands(u8: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weight [N, K] that (u8, sz) describe: (q - 8) * scale + zero, scale and zero as stored (bf16)."""
    n = u8.shape[0]
    codes = torch.stack((u8 >> 4, u8 & 15), dim=-1).reshape(n, -1).float()
    k = codes.shape[1]
    scale = sz[:, :, 0].t().float().unsqueeze(-1)  # [N, K/g, 1]
    zero = sz[:, :, 1].t().float().unsqueeze(-1)
    return ((codes.view(n, k // group, group) - 8.0) * scale + zero).view(n, k)


def int4pack_cuda_tensors(qt: QuantizedTensor) -> List[torch.Tensor]:
    """The kernel's tensors [packed int32, sz bf16] on the device of ``qt`` (a CUDA tensor)."""
    u8, sz = int4pack_operands(qt)
    packed = torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles(qt.shape[1]))
    return [packed, sz]


def int4pack_mm_cuda(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor) -> torch.Tensor:
    """y = x W^T through ``_weight_int4pack_mm`` (any leading shape; bf16 inside, x's dtype out).
    Written in TorchScript's subset (apply_linear calls it)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, packed, group, sz)
    shape = list(x.shape[:-1])
    shape.append(y.shape[1])
    return y.reshape(shape).to(x.dtype)


@functools.lru_cache(maxsize=None)
def int8pack_cuda_dtype(device: str = "cuda") -> Optional[torch.dtype]:
    """The activation dtype (bf16, then fp32) with which ``_weight_int8pack_mm`` runs on ``device`` and
    matches x (q s)^T to within that dtype's rounding; None if torch has no CUDA kernel for it."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (64, 128), generator=gen, dtype=torch.int8)
    s = torch.rand(64, generator=gen) * 0.01 + 1e-3
    x = torch.randn(5, 128, generator=gen)
    want = x.double() @ (w.double() * s.double()[:, None]).t()
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        try:
            got = torch.ops.aten._weight_int8pack_mm(x.to(device, dtype), w.to(device), s.to(device, dtype))
        except (RuntimeError, NotImplementedError):
            continue
        err = float((got.double().cpu() - want).abs().max() / want.abs().max())
        if err < tol:
            return dtype
    return None
