"""RTN: codes, scales and zero points as docs/ALGORITHMS.md ("Quantization") defines them, checked element by element."""

from __future__ import annotations

import pytest
import torch

from loom.compress.quantize.rtn import QuantConfig, fake_quantize, rtn_quantize


def _naive(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0:g0 + group].double()
            if symmetric:
                s = x.abs().max() / (2 ** (bits - 1) - 1)
                q = torch.clamp(torch.round(x / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
                out[r, g0:g0 + group] = (q * s).float()
            else:
                hi, lo = max(float(x.max()), 0.0), min(float(x.min()), 0.0)
                s = (hi - lo) / (2 ** bits - 1)
                z = round(-lo / s)
                q = torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1)
                out[r, g0:g0 + group] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (3, 64, False), (8, 0, True), (4, 16, True),
                                                  (2, 32, False)])
def test_rtn_matches_the_formula(bits, group, symmetric):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(bits))
    cfg = QuantConfig(bits, group, symmetric)
    qt = rtn_quantize(w, cfg)
    assert int(qt.codes.max()) < 2 ** bits
    want = _naive(w, bits, group or 128, symmetric)
    assert torch.allclose(qt.dequantize(), want, atol=1e-6)
    assert torch.equal(fake_quantize(w, cfg), qt.dequantize())


def test_error_is_at_most_half_a_step_and_zero_is_exact():
    w = torch.randn(16, 256)
    w[3, :32] = 0.0
    qt = rtn_quantize(w, QuantConfig(4, 32))
    step = qt.scales.repeat_interleave(32, dim=1)
    assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(qt.dequantize()[3, :32], torch.zeros(32))


def test_int8_per_channel_is_nearly_lossless():
    w = torch.randn(64, 512)
    err = (fake_quantize(w, QuantConfig(8, 0, True)) - w).norm() / w.norm()
    assert err < 0.01


def test_rtn_reaches_every_decoder_linear_including_ungated_mlps():
    from loom.compress.quantize.methods import QuantizeRecipe, quantize
    from loom.config import ModelConfig
    from loom.layers.quantized import QuantizedLinear
    from loom.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                      gated_mlp=False, activation="gelu", max_position_embeddings=32)
    model = quantize(Transformer(cfg).init_random(0), QuantizeRecipe("rtn", QuantConfig(4, 32)))
    for layer in model.layers:
        for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(m, QuantizedLinear)
