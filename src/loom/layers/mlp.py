"""Feed-forward blocks: gated (SwiGLU / GeGLU) and plain two-layer MLPs."""

from __future__ import annotations

import torch
from torch import nn

from loom.config import ModelConfig
from loom.layers import fused
from loom.layers.activation import get_activation
from loom.layers.linear import Linear


class GatedMLP(nn.Module):
    """down(act(x W_gate^T) * (x W_up^T)) (Shazeer 2020); gate and up are one fused matmul."""

    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=bias, dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, bias=bias, dtype=dtype)
        self.activation = activation
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.activation == "silu":
            return self.down_proj(fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """down(act(x W_up^T + b)) + b: the original Transformer's position-wise FFN."""

    def __init__(self, hidden: int, intermediate: int, activation: str, bias: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.up_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, bias=bias, dtype=dtype)
        self.act = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def make_mlp(config: ModelConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    cls = GatedMLP if config.gated_mlp else MLP
    return cls(config.hidden_size, config.intermediate_size, config.activation, config.mlp_bias, dtype)
