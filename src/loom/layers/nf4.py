"""NF4, the 4-bit NormalFloat data type of QLoRA (Dettmers et al. 2023), as stored weights and a frozen linear layer.

The data type (QLoRA section 3, eq. 4 and Appendix E): 16 values, quantiles of N(0, 1),

    q_i = 1/2 (Phi^-1(i / (2^k + 1)) + Phi^-1((i + 1) / (2^k + 1)))        (eq. 4, the idea)

built asymmetrically so that 0 is exactly representable: 8 positive quantiles
Phi^-1(linspace(offset, 1/2, 9)[:-1]) and 7 negative ones -Phi^-1(linspace(offset, 1/2, 8)[:-1]), plus 0, all
divided by the largest so that the range is [-1, 1]. offset = 0.9677083 = 1 - 1/2 (1/30 + 1/32): the middle of
the outermost quantile bins of the 15- and 16-value halves (the paper's code; the rounded 0.9677 moves the
values by 2e-5). ``NF4_CODE_BOOK`` is the table as bitsandbytes publishes it; ``nf4_code_book()`` computes it.

A tensor in NF4 (``NF4Tensor``), flattened row-major into blocks of ``block_size`` (64) consecutive values:

    w_hat[j] = NF4[code[j]] * absmax[j // block_size]

``absmax`` is each block's max |w|. Double quantization (QLoRA section 3, "Double Quantization") stores
those absmax values themselves in 8 bits (``QuantizedAbsmax``): minus their mean, in blocks of 256, each
with one fp32 scale c2 and int8 codes,

    absmax[b] = code2[b] * c2[b // 256] / 127 + mean

which costs 8/64 + 32/(64 * 256) bits per parameter instead of 32/64: 4.127 bits in all (the paper's figure).
The quantizer is loom.compress.quantize.nf4; this module only holds and dequantizes (layers import no
compress code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NF4_OFFSET = 0.9677083

# The 16 NF4 values as bitsandbytes publishes them (its dequantization table), lowest first; index 7 is 0.
NF4_CODE_BOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_ZERO_CODE = 7
INT8_MAX = 127


def nf4_code_book(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The NF4 values computed from the normal quantile function (QLoRA eq. 4 and Appendix E), fp32, sorted.

    Phi^-1 is ``torch.special.ndtri`` (no scipy needed), evaluated in fp64 at fp32 probabilities as the
    paper's code does (torch.linspace, then scipy's norm.ppf).
    """
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)])
    return (values / values.max()).sort().values.float()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (1-D, even length) -> bytes: byte i = code[2i] << 4 | code[2i + 1] (first value in the high
    nibble, bitsandbytes' order)."""
    c = codes.to(torch.uint8).view(-1, 2)
    return (c[:, 0] << 4) | c[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: bytes [n] -> codes [2n] (uint8)."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=1).reshape(-1)


@dataclass
class QuantizedAbsmax:
    """Double-quantized block scales (QLoRA section 3): absmax[b] = codes[b] * scales[b // block_size] / 127 + mean.

    codes: int8 [n], symmetric (-127..127) per block of ``block_size``; the last block may be partial.
    scales: fp32 [ceil(n / block_size)], each block's max |absmax - mean| (0 for a constant block).
    mean: fp32 scalar tensor, the mean of the fp32 absmax values.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mean: torch.Tensor
    block_size: int = 256

    def dequantize(self) -> torch.Tensor:
        """The fp32 absmax values [n]."""
        step = (self.scales / INT8_MAX).repeat_interleave(self.block_size)[: self.codes.numel()]
        return self.codes.float() * step + self.mean

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scales.numel() + 4 * self.mean.numel()

    def to(self, device: torch.device | str) -> QuantizedAbsmax:
        return QuantizedAbsmax(self.codes.to(device), self.scales.to(device), self.mean.to(device), self.block_size)


@dataclass
class NF4Tensor:
    """A tensor in NF4 (see the module doc): packed 4-bit codes, block absmax scales, shape and dtype.

    packed: uint8 [ceil(numel / block_size) * block_size / 2], two codes a byte (``pack_nibbles``). A last
        partial block is padded with zeros (code 7) that ``dequantize`` drops: its absmax is that of its real
        values only.
    absmax: fp32 [blocks], or ``QuantizedAbsmax`` with double quantization.
    shape, dtype: of the original tensor; ``dequantize`` returns that shape and dtype.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | QuantizedAbsmax
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64

    def __post_init__(self) -> None:
        numel = self.shape.numel()
        blocks = -(-numel // self.block_size)
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"the NF4 block size must be even and positive, got {self.block_size}")
        if self.packed.dtype != torch.uint8 or self.packed.numel() * 2 != blocks * self.block_size:
            raise ValueError(f"{numel} values in blocks of {self.block_size} need {blocks * self.block_size // 2} "
                             f"packed bytes, got {self.packed.numel()} ({self.packed.dtype})")
        n_absmax = self.absmax.codes.numel() if isinstance(self.absmax, QuantizedAbsmax) else self.absmax.numel()
        if n_absmax != blocks:
            raise ValueError(f"{blocks} blocks need {blocks} absmax values, got {n_absmax}")

    @property
    def double_quantized(self) -> bool:
        return isinstance(self.absmax, QuantizedAbsmax)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def block_absmax(self) -> torch.Tensor:
        """Each block's absmax in fp32 [blocks] (double quantization undone)."""
        return self.absmax.dequantize() if isinstance(self.absmax, QuantizedAbsmax) else self.absmax.float()

    def dequantize(self) -> torch.Tensor:
        """w_hat = NF4[code] * absmax of its block, computed in fp32, in the original shape and dtype."""
        book = NF4_CODE_BOOK.to(self.device)
        values = book[unpack_nibbles(self.packed).long()].view(-1, self.block_size)
        w = (values * self.block_absmax()[:, None]).reshape(-1)[: self.shape.numel()]
        return w.view(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus the (double-quantized) scales."""
        scales = self.absmax.nbytes if isinstance(self.absmax, QuantizedAbsmax) else 4 * self.absmax.numel()
        return self.packed.numel() + scales

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    def to(self, device: torch.device | str) -> NF4Tensor:
        return NF4Tensor(self.packed.to(device), self.absmax.to(device), self.shape, self.dtype, self.block_size)


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W dequantized from NF4 in the forward and again in the backward: autograd keeps the 4-bit
    weight, not a dense copy, between them (what makes QLoRA's memory small; Dettmers et al. 2023, sec. 3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return F.linear(x, weight.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.weight.dequantize().to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight: y = x dequantize(W)^T + b, the weight dequantized on every
    forward into x's dtype (QLoRA's forward, eq. 5-6, without the adapters: Y = X doubleDequant(c1, c2, W)).

    Gradients flow to x (and to whatever produced it, e.g. LoRA adapters built on top), never to W, which is
    no parameter. The NF4 weight is a plain attribute, not a buffer: ``module.to(dtype)`` must not cast its
    fp32 scales, so move it with ``.to_device``; it is not in ``state_dict``.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"an NF4Linear weight must be 2-D [out, in], got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_nf4 = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self.weight_nf4)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_nf4.dequantize()

    def weight_bytes(self) -> int:
        return self.weight_nf4.nbytes

    def to_device(self, device: torch.device | str) -> NF4Linear:
        self.weight_nf4 = self.weight_nf4.to(device)
        return self.to(device)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, nf4 block {self.weight_nf4.block_size}, "
                f"{self.weight_nf4.bits_per_parameter:.3f} bits/param"
                + (", double-quantized scales" if self.weight_nf4.double_quantized else ""))
