"""NF4 (QLoRA): the code book, the quantizer checked element by element against a naive loop, error bounds,
double quantization, storage size, and the frozen NF4Linear."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loom.compress.quantize.nf4 import nearest_nf4, nf4_linear, quantize_absmax, quantize_nf4
from loom.layers.nf4 import NF4_CODE_BOOK, NF4Linear, NF4Tensor, nf4_code_book, unpack_nibbles

BOOK = [np.float32(v) for v in NF4_CODE_BOOK.tolist()]
HALF_GAP = float((NF4_CODE_BOOK[1:] - NF4_CODE_BOOK[:-1]).max()) / 2


def _naive_codes(w: torch.Tensor, block: int) -> tuple[list[int], list[np.float32]]:
    """Nearest-code indices (first minimum of the fp32 distances) and the fp32 absmax of each block."""
    flat = [np.float32(v) for v in w.float().reshape(-1).tolist()]
    flat += [np.float32(0.0)] * ((-len(flat)) % block)
    codes, absmax = [], []
    for b0 in range(0, len(flat), block):
        amax = max(abs(v) for v in flat[b0:b0 + block])
        absmax.append(amax)
        for v in flat[b0:b0 + block]:
            if amax == 0:
                codes.append(7)
                continue
            x = np.float32(v / amax)
            dist = [abs(c - x) for c in BOOK]
            codes.append(min(range(16), key=lambda i: (dist[i], i)))
    return codes, absmax


def _naive_double_quant(absmax: list[np.float32], block: int) -> list[float]:
    """QuantizedAbsmax's definition in fp64: mean removed, per block of ``block`` int8 codes of (a - mean) / c2."""
    mean = sum(float(a) for a in absmax) / len(absmax)
    out = []
    for b0 in range(0, len(absmax), block):
        part = [float(a) - mean for a in absmax[b0:b0 + block]]
        c2 = max(abs(p) for p in part)
        for p in part:
            q = 0 if c2 == 0 else max(-127, min(127, round(127 * p / c2)))
            out.append(q * c2 / 127 + mean)
    return out


def test_code_book_is_the_published_nf4():
    book = nf4_code_book()
    assert book.shape == (16,) and torch.equal(book, book.sort().values)
    assert (book - NF4_CODE_BOOK).abs().max() < 1e-6
    assert book[0] == -1 and book[15] == 1 and book[7] == 0  # range [-1, 1], 0 exact
    assert (book > 0).sum() == 8 and (book < 0).sum() == 7  # asymmetric: one more positive value
    # offset = 1 - (1/30 + 1/32) / 2; the rounded 0.9677 is measurably a different table
    assert (nf4_code_book(1 - (1 / 30 + 1 / 32) / 2) - NF4_CODE_BOOK).abs().max() < 1e-6
    assert (nf4_code_book(0.9677) - NF4_CODE_BOOK).abs().max() > 1e-5


def test_nearest_takes_the_lower_code_on_a_tie_and_the_nearest_otherwise():
    mid = (NF4_CODE_BOOK[7] + NF4_CODE_BOOK[8]) / 2
    assert (NF4_CODE_BOOK[8] - mid).abs() == (mid - NF4_CODE_BOOK[7]).abs()  # an exact tie in fp32
    x = torch.tensor([-1.0, 1.0, 0.0, float(mid), float(NF4_CODE_BOOK[9]) - 1e-4, 0.041, -0.05])
    assert nearest_nf4(x).tolist() == [0, 15, 7, 7, 9, 8, 6]
    x = torch.rand(10_000) * 2 - 1
    brute = (x[:, None] - NF4_CODE_BOOK[None]).abs().argmin(dim=1)
    assert torch.equal(nearest_nf4(x), brute)


@pytest.mark.parametrize("shape", [(3, 128), (5, 37), (1000,)])
def test_codes_and_values_match_a_naive_loop(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05
    qt = quantize_nf4(w, double_quant=False)
    codes, absmax = _naive_codes(w, 64)
    assert qt.packed.numel() == len(codes) // 2  # the last partial block padded to 64
    assert unpack_nibbles(qt.packed).tolist() == codes
    assert int(qt.packed[0]) >> 4 == codes[0] and int(qt.packed[0]) & 15 == codes[1]  # first value: high nibble
    assert qt.absmax.tolist() == [float(a) for a in absmax]
    n = w.numel()
    want = torch.tensor([float(BOOK[c] * absmax[j // 64]) for j, c in enumerate(codes)][:n]).view(shape)
    assert torch.equal(qt.dequantize(), want)


def test_double_quantized_values_match_a_naive_loop():
    # 301 blocks of 64 (the last partial), so 2 blocks of 256 scales (the last partial)
    w = torch.randn(301 * 64 - 10, generator=torch.Generator().manual_seed(2))
    qt = quantize_nf4(w)
    codes, absmax = _naive_codes(w, 64)
    assert unpack_nibbles(qt.packed).tolist() == codes  # codes are chosen with the exact fp32 absmax
    scales = _naive_double_quant(absmax, 256)
    assert qt.absmax.codes.numel() == 301 and qt.absmax.scales.numel() == 2
    assert torch.allclose(qt.block_absmax().double(), torch.tensor(scales, dtype=torch.float64), rtol=1e-6, atol=0)
    want = torch.tensor([float(BOOK[c]) * scales[j // 64] for j, c in enumerate(codes)][: w.numel()],
                        dtype=torch.float64)
    assert torch.allclose(qt.dequantize().double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_at_most_half_the_largest_gap_times_the_absmax(double_quant):
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(3)) * 0.02
    qt = quantize_nf4(w, double_quant=double_quant)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    err = (qt.dequantize().reshape(-1, 64) - blocks).abs()
    # |w - NF4[c] c1_hat| <= |w - NF4[c] c1| + |NF4[c]| |c1 - c1_hat|, |NF4[c]| <= 1
    bound = HALF_GAP * absmax + (qt.block_absmax() - absmax).abs() + 1e-7
    assert (err <= bound[:, None]).all()
    assert 0.1 < HALF_GAP < 0.16  # the widest gap is the outermost negative one, -1 .. -0.696
    rel = (qt.dequantize() - w).norm() / w.norm()
    assert rel < 0.12  # NF4 on normal weights: ~0.1


def test_double_quantization_keeps_the_scales_within_a_fraction_of_a_percent():
    absmax = torch.randn(64, 4096).abs().amax(dim=1) * 0.02 + 0.001
    dq = quantize_absmax(absmax)
    back = dq.dequantize()
    assert dq.codes.dtype == torch.int8 and dq.scales.dtype == torch.float32
    step = dq.scales.repeat_interleave(256)[: absmax.numel()] / 127
    assert ((back - absmax).abs() <= step / 2 + 1e-7).all()  # at most half an int8 step of its block
    assert ((back - absmax).abs() / absmax).max() < 5e-3
    const = quantize_absmax(torch.full((300,), 0.5))  # every value equal the mean: c2 = 0, no NaN
    assert torch.equal(const.dequantize(), torch.full((300,), 0.5))


def test_bits_per_parameter():
    w = torch.randn(576, 576)
    blocks = 576 * 576 // 64
    qt = quantize_nf4(w)
    want = (576 * 576 // 2 + blocks + 4 * math.ceil(blocks / 256) + 4) * 8 / (576 * 576)
    assert qt.nbytes * 8 / w.numel() == qt.bits_per_parameter == pytest.approx(want)
    assert qt.bits_per_parameter == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=3e-3)  # the paper's 4.127
    assert quantize_nf4(w, double_quant=False).bits_per_parameter == pytest.approx(4.5)


def test_zero_blocks_dequantize_to_zeros():
    w = torch.randn(4, 128)
    w[1, 64:] = 0.0
    qt = quantize_nf4(w)
    out = qt.dequantize()
    assert not out.isnan().any()
    assert torch.equal(out[1, 64:], torch.zeros(64))
    zeros = quantize_nf4(torch.zeros(3, 100))
    assert torch.equal(zeros.dequantize(), torch.zeros(3, 100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_in_fp32_and_bf16(dtype):
    w = torch.randn(8, 192).to(dtype)
    qt = quantize_nf4(w)
    out = qt.dequantize()
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, quantize_nf4(w.float()).dequantize().to(dtype))
    assert (out.float() - w.float()).norm() / w.float().norm() < 0.12


def test_nf4_tensor_rejects_inconsistent_parts():
    qt = quantize_nf4(torch.randn(2, 64))
    with pytest.raises(ValueError):
        NF4Tensor(qt.packed[:-1], qt.absmax, qt.shape, qt.dtype)
    with pytest.raises(ValueError):
        quantize_nf4(torch.randn(10), block_size=63)


def test_nf4_linear_is_the_dequantized_product_and_keeps_the_weight_frozen():
    w, b = torch.randn(48, 64) * 0.05, torch.randn(48)
    layer = nf4_linear(w, b)
    assert isinstance(layer, NF4Linear) and not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 5, 48)
    assert torch.allclose(y, F.linear(x, layer.weight_nf4.dequantize(), b), atol=1e-6)
    lora_a = torch.zeros(4, 64, requires_grad=True)  # an adapter on top of the frozen base (QLoRA eq. 5)
    (y + x @ lora_a.t() @ torch.ones(4, 48)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
    assert layer.bias.grad is None
    yb = layer(x.detach().bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), y.detach(), atol=0.05, rtol=0.02)
    assert layer.weight_bytes() == layer.weight_nf4.nbytes < w.numel() * 4 / 7
