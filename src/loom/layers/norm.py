"""Normalization layers: RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.config import ModelConfig
from loom.layers import fused


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32 (as HF Llama computes them)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused.rms_norm(x, self.weight, self.eps)
        return y if self.bias is None else y + self.bias


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, statistics in fp32 (torch's bf16 kernel accumulates
    in fp32 itself, so bf16 inputs with bf16 weights go in as they are: no widening copies)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        y = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(),
                                     None if self.bias is None else self.bias.float(), self.eps)
        return y.to(x.dtype)


    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """LayerNorm(x + residual): a post-LN block's residual add and norm in one native pass where it can run
        (CPU, fp32 or bf16 with a bias, no gradient), else the two ops."""
        if (self.bias is not None and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == self.weight.dtype
                and fused.use_native(x, residual, self.weight)):
            return torch.ops.loom.add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return self(x + residual)


def make_norm(config: ModelConfig) -> nn.Module:
    cls = RMSNorm if config.norm == "rmsnorm" else LayerNorm
    return cls(config.hidden_size, config.norm_eps, bias=bool(config.norm_bias))


def make_head_norm(config: ModelConfig) -> RMSNorm:
    """The RMSNorm over one head's head_dim values that QK-norm applies to each query and key head."""
    return RMSNorm(config.head_dim, config.norm_eps)
