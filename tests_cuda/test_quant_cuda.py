"""torch's CUDA weight-only kernels behind QuantizedLinear, against the dequantized weights (float64 on the
CPU), and native GGUF 4-bit / 8-bit models on CUDA against their dense fp32 twin."""

from __future__ import annotations

import pytest
import torch

from loom.layers.cuda_quant import dequantize_int4pack_operands, int4pack_operands, int8pack_cuda_dtype
from loom.layers.linear_spec import LinearKind
from loom.layers.quantized import (QuantizedLinear, QuantizedTensor, W8A8Linear, choose_backend,
                                   quantize_activations)


def _random_qt(n: int, k: int, bits: int, group: int, seed: int = 0, symmetric8: bool = False) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offsets = -128.0 * scales if symmetric8 else torch.randn(n, k // group, generator=g) * 0.05
    return QuantizedTensor(codes, scales, offsets, bits, group)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double().cpu()).abs().max() / want.double().abs().max())


SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (64, 256)]  # SmolLM2's q|k|v, o, gate|up, down
CASES = [(n, k, g) for n, k in SHAPES for g in (32, 64, 128, 256) if k % g == 0]


@pytest.mark.parametrize("n,k,group", CASES)
@pytest.mark.parametrize("rows", [1, 5, 17, 64])
def test_int4_cuda_kernel_equals_the_dequantized_weight(n, k, group, rows):
    qt = _random_qt(n, k, 4, group, seed=n + k + group)
    layer = QuantizedLinear(qt.to("cuda"), backend="auto")
    assert layer.backend == "torch" and layer.kind == LinearKind.TORCH_INT4_CUDA
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    y = layer(x.to("cuda", torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # against the format's own definition (bf16 scale/zero, bf16 inputs): the kernel's bf16 fma and output
    u8, sz = int4pack_operands(qt)
    xb = x.to(torch.bfloat16).double()
    assert _rel(y, xb @ dequantize_int4pack_operands(u8, sz, group).double().t()) < 1e-2
    # against loom's exact weights: bf16 rounding of the scales, zeros, inputs and output
    assert _rel(y, xb @ qt.dequantize().double().t()) < 2e-2


def test_int4_cuda_kernel_in_fp32_models_and_3d_inputs():
    qt = _random_qt(128, 256, 4, 64, seed=4)
    layer = QuantizedLinear(qt, torch.randn(128)).to("cuda")  # built on the CPU, moved: re-packed for CUDA
    assert layer.backend == "torch" and layer.kind == LinearKind.TORCH_INT4_CUDA
    x = torch.randn(2, 3, 256)
    y = layer(x.to("cuda"))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 128)
    want = x.double() @ qt.dequantize().double().t() + layer.bias.double().cpu()
    assert _rel(y, want) < 2e-2
    assert torch.equal(layer.quantized().codes.cpu(), qt.codes)


def test_int8_per_channel_on_cuda():
    qt = _random_qt(256, 512, 8, 512, seed=5, symmetric8=True)
    act = int8pack_cuda_dtype("cuda:0")
    print(f"_weight_int8pack_mm on CUDA: {'activations in ' + str(act) if act else 'no working kernel'}")
    layer = QuantizedLinear(qt.to("cuda"))
    assert layer.backend == ("torch" if act is not None else "reference")
    x = torch.randn(7, 512)
    y = layer(x.to("cuda", torch.bfloat16))
    assert _rel(y, x.to(torch.bfloat16).double() @ qt.dequantize().double().t()) < 2e-2


def test_groupwise_int8_falls_back_to_the_reference_and_3bit_runs_on_the_int4_kernel():
    qt = _random_qt(64, 256, 8, 32, seed=6)  # GGUF Q8_0's shape: one scale per 32, no torch kernel
    assert choose_backend(qt.to("cuda")) == "reference"
    layer = QuantizedLinear(qt.to("cuda"))
    x = torch.randn(3, 256)
    y = layer(x.to("cuda"))  # fp32 activations: the reference is exact up to summation order
    assert _rel(y, x.double() @ qt.dequantize().double().t()) < 1e-5
    qt3 = _random_qt(64, 256, 3, 64, seed=7)  # 3-bit codes fit the int4 container
    layer3 = QuantizedLinear(qt3.to("cuda"))
    assert layer3.backend == "torch"
    y3 = layer3(x.to("cuda", torch.bfloat16))
    assert _rel(y3, x.to(torch.bfloat16).double() @ qt3.dequantize().double().t()) < 2e-2
    with pytest.raises(ValueError, match="CPU"):
        QuantizedLinear(_random_qt(64, 256, 4, 32).to("cuda"), backend="loom")


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_w8a8_on_cuda_equals_the_integer_formula(rows):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(8))
    layer = W8A8Linear(w).to("cuda")
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    qx, sx = quantize_activations(x)
    want = (qx.double() @ layer.weight_int8.cpu().double().t()) * sx.double() * layer.weight_scale.cpu().double()
    assert _rel(layer(x.to("cuda")), want) < 1e-6


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_native_gguf_weights_on_cuda_match_the_dense_model(tmp_path, qtype):
    from loom.weights.loader import load_model
    from tests.helpers import save_tiny_hf, write_llama_gguf

    hf = save_tiny_hf(str(tmp_path / "hf"), "llama", num_key_value_heads=2, hidden_size=128, intermediate_size=256)
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_llama_gguf(path, hf, qtype=qtype)
    native = load_model(path, weights="native", device="cuda").model
    dense = load_model(path, weights="fp32").model  # the same quantized weights, dequantized, on the CPU
    backends = {m.backend for m in native.modules() if isinstance(m, QuantizedLinear)}
    assert backends == ({"reference"} if qtype == "Q8_0" else {"torch"})
    assert native.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        got = native.logits(ids.to("cuda")).float()
        want = dense.logits(ids)
    assert _rel(got, want) < 3e-2
