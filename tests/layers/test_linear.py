"""Dense linears: the bf16 weight reordered once for oneDNN (PackedLinear) computes what F.linear computes."""

from __future__ import annotations

import pytest
import torch

from loom.config import ModelConfig
from loom.layers.linear import Linear, PackedLinear, onednn_bf16_available, pack_bf16_linears
from loom.models.transformer import Transformer

pytestmark = pytest.mark.skipif(not onednn_bf16_available(), reason="this CPU / torch build has no oneDNN bf16 GEMM")


def _linear(n_in: int, n_out: int, bias: bool, seed: int) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(n_in, n_out, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(n_out, generator=g))
    return layer


@pytest.mark.parametrize("rows", [1, 5, 17, 64, 300])
@pytest.mark.parametrize("shape,bias", [((576, 960), True), ((576, 1536), False), ((1536, 576), False),
                                        ((100, 37), True)])
def test_packed_equals_f_linear_and_the_definition(rows, shape, bias):
    dense = _linear(*shape, bias, seed=rows)
    packed = PackedLinear(dense)
    x = torch.randn(rows, shape[0], generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    got = packed(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, dense(x))  # the same oneDNN kernel, bias inside
    want = x.double() @ dense.weight.double().t() + (dense.bias.double() if bias else 0)
    assert (got.double() - want).abs().max() <= 2 ** -7 * want.abs().max()  # bf16 output rounding
    assert packed(x.view(1, rows, -1)).shape == (1, rows, shape[1])


def test_packing_keeps_one_copy_and_gives_the_weight_back():
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=96), dtype=torch.bfloat16).init_random(0)
    weights = {n: m.weight.clone() for n, m in model.named_modules() if type(m) is Linear}
    assert pack_bf16_linears(model) == len(weights) == 2 * 4 + 1  # q|k|v, o, gate|up, down per layer; lm_head
    for name, w in weights.items():
        m = model.get_submodule(name)
        assert isinstance(m, PackedLinear) and torch.equal(m.weight, w)
        assert m.weight_bytes() == w.numel() * 2 and not any(True for _ in m.parameters(recurse=False))


def test_only_bf16_cpu_weights_are_packed(monkeypatch):
    with pytest.raises(ValueError, match="bf16"):
        PackedLinear(Linear(8, 8))
    fp32 = Transformer(ModelConfig(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96))
    assert pack_bf16_linears(fp32) == 0
    monkeypatch.setenv("LOOM_PACK_WEIGHTS", "0")
    bf16 = Transformer(ModelConfig(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96),
                       dtype=torch.bfloat16)
    assert pack_bf16_linears(bf16) == 0
