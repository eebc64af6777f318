"""Linear layers: one interface (y = x W^T + b) behind which weight formats can differ.

``Linear`` holds a dense weight [out_features, in_features]. Quantized formats subclass it and
override ``forward`` and ``dequantized_weight``, so the model never knows which it holds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x W^T + b, choosing the faster of two equal formulations for fp32 on CPU.

    For a few rows (a decode batch of 4 to 48 sequences) MKL's kernel for x W^T runs at a fraction
    of its speed, while computing (W x^T)^T gets a kernel 1.5-2.3x faster (measured on the project's
    machine across 4..96 rows; at 1-3 rows and from 64 rows on, plain x W^T is as fast or faster).
    Same products, different summation order: results agree to fp32 rounding. (A CPU-only choice: on
    a GPU cuBLAS picks its own kernel for x W^T.)
    """
    if x.dim() == 2 and x.dtype == torch.float32 and 4 <= x.shape[0] <= 48 and x.device.type == "cpu":
        y = torch.mm(weight, x.t()).t().contiguous()
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """Dense y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def onednn_bf16_available() -> bool:
    """Whether this CPU and torch build run bf16 GEMMs through oneDNN (AMX or AVX512-BF16)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """Dense bf16 y = x W^T + b with W held once, in oneDNN's blocked layout (``LinearKind.ONEDNN``).

    Why: ``F.linear`` on bf16 CPU tensors hands the product to oneDNN, which reorders W into its blocked
    layout on every call; reordered once at load, the same AMX kernels run 1.3-1.8x faster (64 rows of
    SmolLM2's shapes: 780-850 GFLOP/s against 500-570 unpacked and 180-260 for MKL's packed fp32). The
    reordered tensor replaces the plain weight: one copy, the same bytes. ``weight`` gives the plain
    matrix back (a copy) for code that reads it.
    """

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        if linear.weight.dtype != torch.bfloat16 or linear.weight.device.type != "cpu":
            raise ValueError("PackedLinear holds bf16 weights on the CPU")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 64)
        self.bias = linear.bias

    def spec(self):  # type: ignore[no-untyped-def]
        """The bias travels in the spec: oneDNN adds it inside the product, rounded once (as F.linear does)."""
        from loom.layers.linear_spec import LinearKind, LinearSpec

        return LinearSpec(LinearKind.ONEDNN, [self.packed] + ([] if self.bias is None else [self.bias]), 0, 0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from loom.layers.quantized import apply_linear

        shape = x.shape
        return apply_linear(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.spec()).view(*shape[:-1], -1)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight

    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * 2

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, bf16 oneDNN-packed"


def pack_bf16_linears(model: nn.Module) -> int:
    """Replace every dense bf16 ``Linear`` of a CPU model by its ``PackedLinear`` (one copy of each weight);
    returns how many. Nothing when oneDNN's bf16 GEMM is unavailable or LOOM_PACK_WEIGHTS=0."""
    import os

    if os.environ.get("LOOM_PACK_WEIGHTS", "1") == "0" or not onednn_bf16_available():
        return 0
    names = [name for name, m in model.named_modules()
             if type(m) is Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, PackedLinear(getattr(owner, child)))
    return len(names)
