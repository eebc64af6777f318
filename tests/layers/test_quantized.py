"""Quantized linears: every kernel equals the dequantized reference; formats round-trip exactly."""

from __future__ import annotations

import pytest
import torch

from loom import native
from loom.compress.quantize.rtn import QuantConfig, rtn_quantize
from loom.layers.quantized import (PackedW8A8Linear, QuantizationError, QuantizedLinear, QuantizedTensor, W8A8Linear,
                                   onednn_int8_available, pack_int4, quantize_activations, unpack_int4)
from loom.layers.linear import onednn_bf16_available
from loom.models.rotation import hadamard
from tests.helpers import random_quantized_tensor


@pytest.fixture(autouse=True, scope="module")
def _ops_loaded() -> None:
    native.available()




def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def test_int5_packing_is_the_gguf_q5_0_block_layout():
    """pack_int5 of a Q5_0 block's codes is its qs bytes then its qh word: the kernels read the file's layout."""
    import numpy as np
    from gguf.quants import quantize
    from gguf.constants import GGMLQuantizationType as Q

    from loom.layers.quantized import pack_int5, unpack_int5

    w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    blocks = torch.from_numpy(quantize(w, Q.Q5_0)).view(3, 2, 22)  # d (2) | qh (4) | qs (16)
    low = torch.cat((blocks[..., 6:] & 15, blocks[..., 6:] >> 4), dim=-1)  # elements 0..15, 16..31
    high = (blocks[..., 2:6, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    codes = (low | (high.reshape(3, 2, 32) << 4)).reshape(3, 64)
    packed = pack_int5(codes).view(3, 2, 20)
    assert torch.equal(packed[..., :16], blocks[..., 6:]) and torch.equal(packed[..., 16:], blocks[..., 2:6])
    assert torch.equal(unpack_int5(pack_int5(codes)), codes)


def test_int4_packing_round_trips_and_matches_the_gguf_block_layout():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 48)
    assert torch.equal(unpack_int4(packed), codes)
    # byte i of each 32-chunk: element i in the low nibble, element i + 16 in the high nibble
    assert int(packed[2, 16 + 3]) == int(codes[2, 32 + 3]) | (int(codes[2, 32 + 19]) << 4)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (3, 64), (4, 256), (5, 32), (5, 64), (8, 16),
                                        (8, 32), (8, 256), (6, 64), (6, 16)])
@pytest.mark.parametrize("rows", [1, 3, 5, 17, 40])
def test_loom_kernel_equals_dequantized_matmul(bits, group, rows):
    qt = random_quantized_tensor(48, 256, bits, group, seed=bits * 100 + group)
    layer = QuantizedLinear(qt, backend="loom")
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    assert _rel_err(layer(x), _tiled_definition(x, qt.dequantize())) < (4e-3 if _tiled_in_bf16(rows) else 2e-6)


@pytest.mark.parametrize("bits,group", [(4, 32), (5, 32), (8, 16)])
@pytest.mark.parametrize("n", [1, 3, 7, 66])
def test_one_row_gemv_takes_any_output_count(bits, group, n):
    """Batch-1 GEMVs over any count of outputs (the threads' shares are split in tiles of 16 rows) are right,
    measured against the terms' size rather than a cancelled sum."""
    qt = random_quantized_tensor(n, 96, bits, group, seed=n)
    layer = QuantizedLinear(qt, backend="loom")
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(1))
    w = qt.dequantize().double()
    scale = x.double().abs() @ w.abs().t()  # fp32 rounding is relative to the terms, not to a cancelled sum
    assert ((layer(x).double() - x.double() @ w.t()).abs() <= 1e-6 * scale).all()


@pytest.mark.parametrize("bits,group", [(4, 32), (5, 32), (8, 32), (8, 16)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_fp16_scales_run_as_fp16_and_equal_the_definition(bits, group, rows):
    """Scales and offsets that fp16 holds exactly (GGUF's d and m) reach the kernel as fp16, with the same result."""
    qt = random_quantized_tensor(48, 256, bits, group, seed=7)
    scales = qt.scales.half().float()
    # int4: any fp16 offset (Q4_1's m); int5 / int8: symmetric codes (Q5_0, Q8_0), whose kernel offset is 0
    offsets = qt.offsets.half().float() if bits == 4 else -(2.0 ** (bits - 1)) * scales
    qt = type(qt)(qt.codes, scales, offsets, bits, group)
    layer = QuantizedLinear(qt, backend="loom")
    assert layer.spec().tensors[1].dtype == torch.float16
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    assert _rel_err(layer(x), _tiled_definition(x, qt.dequantize())) < (4e-3 if _tiled_in_bf16(rows) else 2e-6)
    fp32 = QuantizedLinear(random_quantized_tensor(48, 256, bits, group, seed=7), backend="loom")
    assert fp32.spec().tensors[1].dtype == torch.float32  # not exact in fp16: kept fp32


def _tiled_in_bf16(rows: int) -> bool:
    """More than 32 rows take the tiled product, in bf16 where the CPU has bf16 GEMMs."""
    return rows > 32 and onednn_bf16_available()


def _tiled_definition(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T in float64 from what the kernel multiplies: x and W rounded to bf16 on the bf16 path (whose
    output is then rounded to bf16 once: the tolerance), as they are otherwise."""
    if _tiled_in_bf16(x.shape[0]):
        x, w = x.bfloat16(), w.bfloat16()
    return x.double() @ w.double().t()


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


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64), (5, 32), (5, 16), (8, 32), (8, 128)])
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


def _rows_int8_definition(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of x H_b / sqrt(b) in float64: the quantizer's definition."""
    xd = x.double()
    if block:
        xd = xd @ torch.block_diag(*[hadamard(block)] * (x.shape[1] // block)) / block ** 0.5
    s = xd.abs().amax(1, keepdim=True) / 127
    return torch.round(xd / torch.where(s > 0, s, 1.0)).clamp(-127, 127), s


needs_int8 = pytest.mark.skipif(not onednn_int8_available(), reason="this CPU / torch build has no oneDNN int8 GEMM")


@needs_int8
@pytest.mark.parametrize("block", [0, 8, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_quantizer_is_the_definition(block, dtype):
    """Codes within one step of the float64 definition (the fp32 Hadamard transform may move a value across
    a rounding boundary), nearly all equal; scales to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 1536, generator=g) * torch.rand(37, 1, generator=g) * 5).to(dtype)
    x[3, 100] = 80.0  # an outlier channel
    x[5] = 0.0  # an all-zero row: codes 0
    q, s = torch.ops.loom.quantize_rows_int8(x, block)
    want_q, want_s = _rows_int8_definition(x, block)
    assert q.dtype == torch.int8 and s.shape == (37, 1)
    assert (q.double() - want_q).abs().max() <= 1 and (q.double() == want_q).double().mean() > 0.999
    nonzero = want_s[:, 0] > 0
    assert torch.allclose(s.double()[nonzero], want_s[nonzero], rtol=1e-6)
    assert (q[5] == 0).all()


@needs_int8
@pytest.mark.parametrize("rows", [1, 5, 17, 64, 300])
@pytest.mark.parametrize("k,n,block", [(576, 960, 0), (1536, 576, 512), (576, 3072, 64), (40, 24, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_w8a8_equals_the_integer_formula(rows, k, n, block, dtype):
    """SmolLM2's shapes and odd ones: y = s_x s_w (q_x . q_w) + b in float64 from the layer's own codes,
    rounded once to the activations' dtype; and close to the fp32 product."""
    g = torch.Generator().manual_seed(rows + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g).to(dtype)
    layer = PackedW8A8Linear(w, b, block)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, n)
    qx, sx = torch.ops.loom.quantize_rows_int8(x, block)
    qw = layer.packed.to_dense().t().double()
    assert torch.equal(qw, torch.round(w.double() / (w.double().abs().amax(1, keepdim=True) / 127)))
    want = (qx.double() @ qw.t()) * sx.double() * layer.weight_scale.double() + b.double()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert ((y.double() - want).abs() <= tol * want.abs() + 1e-4).all()
    rotated = x.double() @ (torch.block_diag(*[hadamard(block)] * (k // block)) / block ** 0.5 if block else
                            torch.eye(k, dtype=torch.float64))
    exact = rotated @ w.double().t() + b.double()  # the layer's W is given in the rotated basis
    assert _rel_err(y.float(), exact.float()) < 0.03  # int8 x int8 stays close to the exact product


@needs_int8
def test_packed_w8a8_weight_unpacks_and_takes_any_leading_shape():
    w = torch.randn(48, 64)
    layer = PackedW8A8Linear(w)
    assert (layer.weight - w).abs().max() <= layer.weight_scale.max() / 2 + 1e-6
    x = torch.randn(2, 3, 64)
    assert torch.allclose(layer(x), layer(x.reshape(6, 64)).reshape(2, 3, 48))
    with pytest.raises(ValueError, match="power of two"):
        PackedW8A8Linear(w, hadamard=48)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (5, 32), (5, 96), (8, 32), (8, 96), (8, 16)])
def test_native_dequantize_equals_the_definition(bits, group):
    qt = random_quantized_tensor(40, 192, bits, group)
    layer = QuantizedLinear(qt, backend="loom")
    _, t, container, g, _ = layer.spec()
    offsets = t[2] if t[2].numel() else None
    got = torch.ops.loom.quant_dequantize(t[0], t[1], offsets, container, g)
    assert torch.allclose(got, qt.dequantize(), rtol=1e-6, atol=1e-7)
    x = torch.randn(40, 192)  # more than 32 rows: the tiled dequantize-then-GEMM path
    assert _rel_err(layer(x), _tiled_definition(x, qt.dequantize())) < (4e-3 if _tiled_in_bf16(40) else 2e-6)


@pytest.mark.parametrize("bits,group,k", [(4, 32, 64), (5, 32, 64), (8, 32, 64), (6, 16, 64), (4, 16, 48)])
def test_quantized_embedding_looks_rows_up_without_a_dense_table(bits, group, k):
    """Each container (int4, int5, int8: the last two shapes fall back to int8) gives exactly the rows of the
    dequantized table, any id shape, in the model's dtype; a tied lookup reads the output layer's own buffers."""
    from loom.layers.quantized import QuantizedEmbedding

    qt = random_quantized_tensor(50, k, bits, group, seed=bits)
    head = QuantizedLinear(qt)
    table = qt.dequantize()
    ids = torch.tensor([[3, 49, 0], [7, 7, 11]])
    own = QuantizedEmbedding(QuantizedLinear(qt))
    tied = QuantizedEmbedding(head, tied=True)
    for emb in (own, tied):
        assert torch.equal(emb(ids), table[ids])
    assert QuantizedEmbedding(head, torch.bfloat16, tied=True)(ids).dtype == torch.bfloat16
    assert list(tied.state_dict()) == [] and "table.qweight" in own.state_dict()  # the tied one owns nothing
    assert tied.source.qweight.data_ptr() == head.qweight.data_ptr()
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        own(torch.tensor([50]))


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, False), (5, 32, True), (8, 32, True), (8, 16, False)])
def test_refresh_kernel_writes_what_a_fresh_layer_holds_in_place(bits, group, symmetric):
    """A layer whose buffers were overwritten with another weight of its format (a streamed slot) refreshes its
    kernel tensors in place (the native pass where it applies) to exactly what a layer built from that weight
    holds: dtype (fp16 where exact), emptiness (symmetric int5 / int8) and values."""
    def weight(seed: int) -> QuantizedTensor:
        qt = random_quantized_tensor(48, 64, bits, group, seed=seed)
        scales = qt.scales.half().float()  # fp16-exact, as GGUF's d
        offsets = -(2 ** (bits - 1)) * scales if symmetric else qt.offsets.half().float()
        return QuantizedTensor(qt.codes, scales, offsets, bits, group)

    slot, fresh = QuantizedLinear(weight(1)), QuantizedLinear(weight(2))
    pointers = [t.data_ptr() for t in slot.kernel_tensors]
    slot.load_(weight(2), 0)
    slot.refresh_kernel()
    assert [t.data_ptr() for t in slot.kernel_tensors] == pointers  # written in place
    for a, b in zip(slot.kernel_tensors, fresh.kernel_tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(3, 64)
    assert torch.equal(slot(x), fresh(x))
