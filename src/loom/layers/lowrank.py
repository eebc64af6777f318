"""Low-rank linear layers: y = x W^T + b with W held as a product of two thin factors.

    W ~ U_r V_r,   up = U_r [out, r],   down = V_r [r, in]
    y = (x down^T) up^T + b                    r (out + in) multiply-adds per row instead of out * in

``LowRankLinear`` is one such pair (a projection of the Hugging Face model: q_proj, down_proj, ...).
loom fuses q|k|v and gate|up into one linear each; ``FusedLinear`` holds one module per HF projection,
in row order, and concatenates their outputs, so each projection keeps its own rank (a budget per HF
projection, not per fused matrix) and a checkpoint stores each one under its own HF name. A part may
also stay dense (a plain ``Linear``) when only some projections are factorized.

The factors are plain fp32 (or the model's dtype) ``nn.Parameter`` s, so autograd trains them (a
distillation step fine-tunes a factorized student); like every loom layer they are frozen at
construction (``requires_grad=False``): training unfreezes what it trains (``factor_parameters``).
The compiled decode steps (engine/step/) do not take these layers: a model holding them decodes through
the module forward (``llama_shaped`` is False for it).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from loom.layers.linear import Linear, linear


class LowRankLinear(nn.Module):
    """y = (x down^T) up^T + b with down [rank, in_features] and up [out_features, rank]."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"low-rank factors must be up [out, r] and down [r, in], got up {tuple(up.shape)} "
                             f"and down {tuple(down.shape)}")
        if bias is not None and tuple(bias.shape) != (up.shape[0],):
            raise ValueError(f"the bias must have {up.shape[0]} entries, got {tuple(bias.shape)}")
        self.rank, self.in_features = down.shape
        self.out_features = up.shape[0]
        self.down = nn.Parameter(down.detach().contiguous(), requires_grad=False)
        self.up = nn.Parameter(up.detach().to(down.dtype).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(down.dtype).contiguous(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.down), self.up, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense W = up down this layer computes with (a new tensor)."""
        return self.up @ self.down

    def num_weight_parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class FusedLinear(nn.Module):
    """loom's fused q|k|v or gate|up as separate projections (each low-rank or dense), outputs concatenated
    along the last dimension in row order: the same y = x W^T + b as the fused dense layer it replaces."""

    def __init__(self, parts: Iterable[nn.Module], names: Iterable[str]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.names = tuple(names)
        if len(self.names) != len(self.parts) or not self.parts:
            raise ValueError("a fused linear needs one name per part, and at least one part")
        ins = {p.in_features for p in self.parts}
        if len(ins) != 1:
            raise ValueError(f"the parts of a fused linear must share their input size, got {sorted(ins)}")
        self.in_features = ins.pop()
        self.out_features = sum(p.out_features for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([part.dequantized_weight() for part in self.parts])

    @property
    def bias(self) -> torch.Tensor | None:
        """The parts' biases concatenated (None when the parts have none)."""
        biases = [part.bias for part in self.parts]
        given = [b for b in biases if b is not None]
        if not given:
            return None
        return torch.cat([b.detach() if b is not None else given[0].new_zeros(p.out_features)
                          for b, p in zip(biases, self.parts)])

    def named_parts(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.names, self.parts))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {type(p).__name__}" for n, p in self.named_parts())


def lowrank_parts(module: nn.Module) -> list[LowRankLinear]:
    """The low-rank pairs inside one linear slot (itself, or the low-rank parts of a fused one)."""
    if isinstance(module, LowRankLinear):
        return [module]
    if isinstance(module, FusedLinear):
        return [p for p in module.parts if isinstance(p, LowRankLinear)]
    return []


def is_lowrank(module: nn.Module) -> bool:
    return bool(lowrank_parts(module))


def factor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every low-rank factor (down, up) of ``model``, in module order: what a distillation step trains
    (call ``requires_grad_(True)`` on them; biases and dense parts are left out)."""
    return [p for m in model.modules() if isinstance(m, LowRankLinear) for p in (m.down, m.up)]


def dense_part(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """A plain loom ``Linear`` holding ``weight`` (and ``bias``): a part left dense inside a ``FusedLinear``."""
    out_features, in_features = weight.shape
    layer = Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype)
    layer.weight.data = weight.detach().contiguous()
    if bias is not None:
        layer.bias.data = bias.detach().to(weight.dtype).contiguous()
    return layer
