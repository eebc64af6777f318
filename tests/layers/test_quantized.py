"""Quantized linears: every kernel equals the dequantized reference; formats round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from loom import native
from loom.compress.quantize.rtn import QuantConfig, rtn_quantize
from loom.layers.quantized import (QuantizationError, QuantizedLinear, QuantizedTensor, W8A8Linear, pack_int4,
                                   quantize_activations, unpack_int4)
from tests.helpers import random_quantized_tensor


@pytest.fixture(autouse=True, scope="module")
def _ops_loaded() -> None:
    native.available()




def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def test_int4_packing_round_trips_and_matches_the_gguf_block_layout():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 48)
    assert torch.equal(unpack_int4(packed), codes)
    # byte i of each 32-chunk: element i in the low nibble, element i + 16 in the high nibble
    assert int(packed[2, 16 + 3]) == int(codes[2, 32 + 3]) | (int(codes[2, 32 + 19]) << 4)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (3, 64), (4, 256), (8, 32), (8, 256), (6, 64)])
@pytest.mark.parametrize("rows", [1, 3, 5, 17, 40])
def test_loom_kernel_equals_dequantized_matmul(bits, group, rows):
    qt = random_quantized_tensor(48, 256, bits, group, seed=bits * 100 + group)
    layer = QuantizedLinear(qt, backend="loom")
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ qt.dequantize().double().t()
    assert _rel_err(layer(x), want) < 2e-6


def test_loom_kernel_takes_any_leading_shape_and_bias():
    qt = random_quantized_tensor(32, 64, 4, 32)
    bias = torch.randn(32)
    layer = QuantizedLinear(qt, bias, backend="loom")
    x = torch.randn(2, 3, 64)
    assert _rel_err(layer(x), x @ qt.dequantize().t() + bias) < 2e-6


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (3, 64)])
def test_torch_int4_kernel_equals_reference_in_bf16(bits, group):
    qt = random_quantized_tensor(64, 256, bits, group)
    layer = QuantizedLinear(qt, backend="torch")
    assert layer.backend == "torch"
    x = torch.randn(3, 256)
    # torch's kernel computes in bf16: activations, scales and zeros are rounded to bf16 first
    s = qt.scales.bfloat16().float()
    z = (qt.offsets + 8 * qt.scales).bfloat16().float()
    w = ((qt.codes.float() - 8).view(64, -1, group) * s[..., None] + z[..., None]).view(64, 256)
    want = x.bfloat16().double() @ w.double().t()
    assert _rel_err(layer(x), want) < 1e-2


def test_torch_int8_kernel_per_channel_symmetric():
    w = torch.randn(64, 128)
    qt = rtn_quantize(w, QuantConfig(bits=8, group_size=0, symmetric=True))
    layer = QuantizedLinear(qt, backend="torch")
    x = torch.randn(2, 128)
    assert _rel_err(layer(x), x @ qt.dequantize().t()) < 1e-2


def test_reference_backend_is_the_definition():
    qt = random_quantized_tensor(16, 64, 4, 32)
    layer = QuantizedLinear(qt, backend="reference")
    x = torch.randn(4, 64)
    assert torch.allclose(layer(x), x @ qt.dequantize().t(), atol=1e-6)


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (8, 32), (8, 128)])
def test_quantized_form_round_trips_exactly(bits, group):
    qt = random_quantized_tensor(32, 128, bits, group)
    back = QuantizedLinear(qt, backend="loom").quantized()
    assert torch.equal(back.codes, qt.codes)
    assert torch.equal(back.scales, qt.scales)
    assert torch.allclose(back.offsets, qt.offsets, rtol=0, atol=1e-7)  # int8: offset + 128 s - 128 s


def test_unsupported_formats_say_why():
    with pytest.raises(QuantizationError, match="does not divide"):
        rtn_quantize(torch.randn(8, 100), QuantConfig(bits=4, group_size=32))
    with pytest.raises(QuantizationError, match="groups"):
        QuantizedLinear(random_quantized_tensor(32, 192, 4, 96), backend="torch")
    with pytest.raises(QuantizationError, match="divisible by 16"):
        QuantizedLinear(random_quantized_tensor(24, 64, 4, 32), backend="torch")
    with pytest.raises(QuantizationError, match="multiples of 32"):
        QuantizedLinear(random_quantized_tensor(32, 48, 4, 16), backend="loom")
    with pytest.raises(QuantizationError, match="symmetric"):
        QuantizedLinear(rtn_quantize(torch.randn(16, 64), QuantConfig(8, 0, symmetric=False)), backend="torch")
    with pytest.raises(QuantizationError, match="bits"):
        QuantConfig(bits=1)
    # the automatic choice falls back to a kernel that can run it
    assert QuantizedLinear(random_quantized_tensor(32, 48, 4, 16)).backend == "reference"


def test_w8a8_equals_integer_formula():
    torch.manual_seed(0)
    w, x = torch.randn(40, 96), torch.randn(7, 96) * 3
    layer = W8A8Linear(w)
    sw = w.abs().amax(1) / 127
    qw = torch.round(w / sw[:, None]).clamp(-127, 127)
    qx, sx = quantize_activations(x)
    want = (qx.double() @ qw.double().t()) * sx.double() * sw.double()[None]
    assert torch.allclose(layer(x).double(), want, rtol=1e-6, atol=1e-6)
    assert _rel_err(layer(x), x @ w.t()) < 0.02  # int8 x int8 stays close to fp32


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 96)])
def test_native_dequantize_equals_the_definition(bits, group):
    qt = random_quantized_tensor(40, 192, bits, group)
    layer = QuantizedLinear(qt, backend="loom")
    _, t, container, g, _ = layer.spec()
    offsets = t[2] if t[2].numel() else None
    got = torch.ops.loom.quant_dequantize(t[0], t[1], offsets, container, g)
    assert torch.allclose(got, qt.dequantize(), rtol=1e-6, atol=1e-7)
    x = torch.randn(40, 192)  # more than 32 rows: the dequantize-then-GEMM path
    assert _rel_err(layer(x), x @ qt.dequantize().t()) < 2e-6
