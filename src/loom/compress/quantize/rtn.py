"""Round-to-nearest (RTN) quantization of a weight matrix, group-wise, on a uniform grid.

Asymmetric (docs/ALGORITHMS.md, "Quantization"): with the group's range widened to include 0 (as GPTQ's quantizer does,
so that zero stays exactly representable and a constant group cannot make the scale 0),
    scale = (max - min) / (2^b - 1),  zero = round(-min / scale),
    q = clamp(round(w / scale) + zero, 0, 2^b - 1),  w_hat = (q - zero) scale.
Symmetric: scale = absmax / (2^(b-1) - 1), q = clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1).
Both are stored as unsigned codes with an offset (``QuantizedTensor``): offset = -zero scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.layers.quantized import QuantizationError, QuantizedTensor


@dataclass(frozen=True)
class QuantConfig:
    """What a weight-only method produces: ``bits`` per code, one scale per ``group_size`` inputs
    (0 = one per output channel), symmetric or asymmetric grid."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise QuantizationError(f"bits must be 2..8, got {self.bits}")
        if self.group_size < 0:
            raise QuantizationError(f"group size must be >= 0 (0 = per channel), got {self.group_size}")

    def group_for(self, in_features: int) -> int:
        g = self.group_size or in_features
        if in_features % g:
            raise QuantizationError(f"group size {g} does not divide the input size {in_features}")
        return g


def grid(w: torch.Tensor, config: QuantConfig, max_scale: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each row of ``w`` [rows, group] (one group per row).

    ``max_scale`` (a factor per row, <= 1) shrinks the range first: AWQ's and GPTQ's clipping search.
    """
    w = w.float()
    if config.symmetric:
        absmax = w.abs().amax(dim=1)
        if max_scale is not None:
            absmax = absmax * max_scale
        qmax = 2 ** (config.bits - 1) - 1
        scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        return scale, torch.full_like(scale, float(2 ** (config.bits - 1)))
    hi = w.amax(dim=1).clamp_min(0)
    lo = w.amin(dim=1).clamp_max(0)
    if max_scale is not None:
        hi, lo = hi * max_scale, lo * max_scale
    scale = (hi - lo) / (2 ** config.bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale)


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` [rows, group] on the grid (scale, zero) [rows]: clamp(round(w / s) + z, 0, 2^b - 1)."""
    return torch.clamp(torch.round(w.float() / scale[:, None]) + zero[:, None], 0, 2 ** bits - 1)


def fake_quantize(w: torch.Tensor, config: QuantConfig, max_scale: torch.Tensor | None = None) -> torch.Tensor:
    """w_hat = (q - zero) scale, group-wise, same shape as ``w`` [N, K] (for searches and errors)."""
    n, k = w.shape
    g = config.group_for(k)
    rows = w.reshape(-1, g)
    scale, zero = grid(rows, config, None if max_scale is None else max_scale.reshape(-1))
    q = quantize_groups(rows, scale, zero, config.bits)
    # The stored form's arithmetic (q scale + offset), so searches see exactly what will run.
    return (q * scale[:, None] + (-zero * scale)[:, None]).reshape(n, k)


def rtn_quantize(w: torch.Tensor, config: QuantConfig, max_scale: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest codes of ``w`` [N, K]; ``max_scale`` [N, K / group] optionally clips each group."""
    n, k = w.shape
    g = config.group_for(k)
    rows = w.reshape(-1, g)
    scale, zero = grid(rows, config, None if max_scale is None else max_scale.reshape(-1))
    q = quantize_groups(rows, scale, zero, config.bits)
    return QuantizedTensor(q.to(torch.uint8).reshape(n, k), scale.reshape(n, k // g),
                           (-zero * scale).reshape(n, k // g), config.bits, g)
