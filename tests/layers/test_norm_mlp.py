"""Norms and MLPs against their formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.layers.mlp import MLP, GatedMLP
from loom.layers.norm import LayerNorm, RMSNorm


def test_rmsnorm_formula():
    n = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.randn(16))
    x = torch.randn(4, 16) * 3
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), want)
    torch.testing.assert_close(n.to(torch.bfloat16)(x.bfloat16()).float(), want, atol=0.05, rtol=0.02)


def test_layernorm_formula():
    n = LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        n.weight.copy_(torch.randn(16))
        n.bias.copy_(torch.randn(16))
    x = torch.randn(4, 16) + 2
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(n(x), (x - mu) / torch.sqrt(var + 1e-5) * n.weight + n.bias)


def test_swiglu_and_plain_mlp():
    g = GatedMLP(8, 12, "silu")
    for p in g.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 8)
    wg, wu = g.gate_up_proj.weight[:12], g.gate_up_proj.weight[12:]
    torch.testing.assert_close(g(x), (F.silu(x @ wg.T) * (x @ wu.T)) @ g.down_proj.weight.T)
    m = MLP(8, 12, "gelu", bias=True)
    for p in m.parameters():
        torch.nn.init.normal_(p)
    want = F.gelu(x @ m.up_proj.weight.T + m.up_proj.bias) @ m.down_proj.weight.T + m.down_proj.bias
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 48, 49, 200])
def test_linear_formulations_agree(rows):
    from loom.layers.linear import linear

    x, w, b = torch.randn(rows, 64), torch.randn(96, 64), torch.randn(96)
    torch.testing.assert_close(linear(x, w, b), x @ w.T + b, atol=1e-5, rtol=1e-5)
    assert linear(x, w).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_of_a_residual_sum_in_one_pass(dtype):
    """LayerNorm.add_forward (the native add + LayerNorm of post-LN blocks) equals LayerNorm(x + y): the sum
    rounded to the storage type first, both within the output's own rounding of the float64 definition."""
    g = torch.Generator().manual_seed(0)
    ln = LayerNorm(384, 1e-12).to(dtype)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(384, generator=g))
        ln.bias.copy_(0.1 * torch.randn(384, generator=g))
    x, y = (torch.randn(5, 7, 384, generator=g).to(dtype) for _ in range(2))
    got, unfused = ln.add_forward(x, y), ln(x + y)
    ref = F.layer_norm((x + y).double(), (384,), ln.weight.double(), ln.bias.double(), 1e-12)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    assert got.dtype == dtype and (got.double() - ref).abs().max() <= tol
    assert (got.double() - unfused.double()).abs().max() <= tol
