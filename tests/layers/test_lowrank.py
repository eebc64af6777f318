"""Low-rank linears: y = (x down^T) up^T + b is x W^T + b with W = up down, fused parts concatenate, and
autograd trains the factors."""

from __future__ import annotations

import pytest
import torch

from loom.layers.linear import Linear
from loom.layers.lowrank import FusedLinear, LowRankLinear, dense_part, factor_parameters, is_lowrank, lowrank_parts


def _factors(out: int, n_in: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n_in, generator=g), torch.randn(out, r, generator=g) * 0.1, torch.randn(out, generator=g)


@pytest.mark.parametrize("rows", [1, 7, 64])  # 7: loom's (W x^T)^T path for a few rows
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_product_of_the_factors(rows, bias):
    down, up, b = _factors(40, 24, 5)
    layer = LowRankLinear(down, up, b if bias else None)
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(1))
    want = x.double() @ (up.double() @ down.double()).t() + (b.double() if bias else 0)
    got = layer(x)
    assert got.shape == (rows, 40) and torch.allclose(got.double(), want, atol=1e-5)
    assert layer(x.view(1, rows, 24)).shape == (1, rows, 40)
    assert torch.allclose(layer.dequantized_weight(), up @ down)
    assert (layer.rank, layer.in_features, layer.out_features) == (5, 24, 40)
    assert layer.num_weight_parameters() == 5 * (24 + 40)


def test_factors_train_by_autograd():
    down, up, b = _factors(12, 8, 3)
    layer = LowRankLinear(down, up, b)
    assert not any(p.requires_grad for p in layer.parameters())  # frozen at construction, as every loom layer
    params = factor_parameters(layer)
    assert params == [layer.down, layer.up]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    layer(x).pow(2).sum().backward()
    d, u = down.clone().requires_grad_(True), up.clone().requires_grad_(True)
    ((x @ d.t()) @ u.t() + b).pow(2).sum().backward()
    assert torch.allclose(layer.down.grad, d.grad, atol=1e-5) and torch.allclose(layer.up.grad, u.grad, atol=1e-5)
    assert layer.down.dtype == torch.float32


def test_fused_parts_concatenate_in_row_order():
    q = LowRankLinear(*_factors(16, 8, 2, seed=1))
    k = dense_part(torch.randn(4, 8), torch.randn(4))
    v = LowRankLinear(*_factors(4, 8, 3, seed=2))
    fused = FusedLinear([q, k, v], ["q_proj", "k_proj", "v_proj"])
    assert (fused.in_features, fused.out_features) == (8, 24) and type(k) is Linear
    x = torch.randn(6, 8)
    w = fused.dequantized_weight()
    assert torch.allclose(fused(x), x @ w.t() + fused.bias, atol=1e-5)
    assert torch.equal(fused.bias, torch.cat([q.bias, k.bias, v.bias]))
    assert lowrank_parts(fused) == [q, v] and is_lowrank(fused) and not is_lowrank(k)
    assert [n for n, _ in fused.named_parts()] == ["q_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize("down,up,bias", [((3, 8), (10, 4), None), ((3, 8, 1), (10, 3), None),
                                          ((3, 8), (10, 3), (9,))])
def test_inconsistent_factors_are_refused(down, up, bias):
    with pytest.raises(ValueError, match="factors must be|bias must have"):
        LowRankLinear(torch.zeros(down), torch.zeros(up), None if bias is None else torch.zeros(bias))


def test_fused_parts_must_share_the_input():
    with pytest.raises(ValueError, match="share their input"):
        FusedLinear([LowRankLinear(*_factors(4, 8, 2)), LowRankLinear(*_factors(4, 6, 2))], ["a", "b"])
