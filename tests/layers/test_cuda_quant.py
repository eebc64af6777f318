"""The operands loom builds for torch's CUDA int4 kernel, checked on the CPU against the dequantized weights.

The kernel itself needs a GPU (tests_cuda/); what can be checked here is that (u8, sz) describe exactly
loom's w = q s + o under the kernel's documented formula w = (q - 8) * scale + zero.
"""

from __future__ import annotations

import pytest
import torch

from loom.layers.cuda_quant import (cuda_int4_problem, dequantize_int4pack_operands, inner_k_tiles,
                                    int4pack_operands)
from loom.layers.quantized import QuantizedLinear, QuantizedTensor, choose_backend
from tests.helpers import random_quantized_tensor




def test_bytes_hold_even_codes_in_the_high_nibble():
    qt = random_quantized_tensor(8, 64, 4, 32)
    u8, _ = int4pack_operands(qt)
    assert u8.shape == (8, 32) and u8.dtype == torch.uint8
    for n, i in ((0, 0), (3, 7), (7, 31)):
        assert int(u8[n, i]) == (int(qt.codes[n, 2 * i]) << 4) | int(qt.codes[n, 2 * i + 1])


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, 256), (3, 32), (2, 64)])
def test_operands_describe_the_dequantized_weight_within_bf16_rounding(bits, group):
    qt = random_quantized_tensor(24, 512, bits, group, seed=bits * 1000 + group)
    u8, sz = int4pack_operands(qt)
    assert sz.shape == (512 // group, 24, 2) and sz.dtype == torch.bfloat16
    got, want = dequantize_int4pack_operands(u8, sz, group), qt.dequantize()
    # scale and zero are rounded to bf16 (relative 2^-9 each): |dw| <= |q - 8| |ds| + |dz|
    s = qt.scales.repeat_interleave(group, dim=1)
    zero = (qt.offsets + 8 * qt.scales).repeat_interleave(group, dim=1)
    bound = (qt.codes.float() - 8).abs() * s * 2 ** -8 + zero.abs() * 2 ** -8 + 1e-7
    assert bool(((got - want).abs() <= bound).all())
    # and with the exact scale and zero the formula reproduces the weights to fp32 rounding
    exact = ((qt.codes.float() - 8) * s + zero)
    assert (exact - want).abs().max() < 1e-6


def test_inner_k_tiles_takes_the_widest_packing_that_divides():
    assert [inner_k_tiles(k) for k in (1536, 576, 96, 32)] == [8, 4, 2, 2]
    with pytest.raises(ValueError):
        inner_k_tiles(48)


def test_cuda_int4_constraints_say_why():
    assert cuda_int4_problem(random_quantized_tensor(16, 64, 4, 32)) is None
    assert "groups" in cuda_int4_problem(random_quantized_tensor(16, 96, 4, 96))
    assert "divisible by 8" in cuda_int4_problem(random_quantized_tensor(12, 64, 4, 32))
    assert "4 bits" in cuda_int4_problem(random_quantized_tensor(16, 64, 8, 32))


def test_cpu_choice_is_unchanged_and_loom_refuses_other_devices():
    qt = random_quantized_tensor(16, 64, 4, 32)
    assert qt.to("cpu").device.type == "cpu"
    assert choose_backend(qt, "reference") == "reference"
    assert choose_backend(qt, "torch") == "torch"
    meta = QuantizedTensor(qt.codes.to("meta"), qt.scales.to("meta"), qt.offsets.to("meta"), 4, 32)
    from loom.layers.quantized import loom_backend_problem

    assert "CPU code" in loom_backend_problem(meta)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_moving_a_layer_rebuilds_its_kernel_and_keeps_its_output(backend):
    qt = random_quantized_tensor(32, 64, 4, 32)
    layer = QuantizedLinear(qt, torch.randn(32), backend=backend)
    x = torch.randn(3, 64)
    before = layer(x)
    layer.to("cpu")  # _apply runs: the kernel tensors are rebuilt from the buffers
    assert torch.equal(layer(x), before)
    assert torch.equal(layer.quantized().codes, qt.codes)


def test_reference_kernel_keeps_the_activation_dtype():
    qt = random_quantized_tensor(16, 64, 4, 32)
    layer = QuantizedLinear(qt, torch.randn(16), backend="reference")
    x = torch.randn(2, 64)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    want = x.to(torch.bfloat16).double() @ qt.dequantize().double().t() + layer.bias.double()
    assert float((y.double() - want).abs().max() / want.abs().max()) < 1e-2
