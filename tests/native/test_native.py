"""Native kernels equal their PyTorch definitions (fp32 and bf16 storage)."""

from __future__ import annotations

import pytest
import torch

from loom import native
from loom.layers import fused
from loom.layers.kernels import naive_attention, paged_decode_attention_native, paged_decode_attention_torch


@pytest.fixture(autouse=True, scope="module")
def _ops_loaded() -> None:
    native.available()  # builds (or loads) the extension, registering torch.ops.loom


def test_native_ops_build_here():
    # The project's machines have a compiler: the native path must be the one that runs.
    assert native.available()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm(dtype, tol):
    x = (torch.randn(37, 576) * 3).to(dtype)
    w = torch.randn(576).to(dtype)
    got = torch.ops.loom.rms_norm(x, w, 1e-5).float()
    want = fused.rms_norm_torch(x, w, 1e-5).float()
    assert (got - want).abs().max() <= tol * want.abs().max()
    y, h = torch.ops.loom.add_rms_norm(x, x * 2, w, 1e-5)
    assert torch.equal(h, (x.float() + (x * 2).float()).to(dtype))
    assert (y.float() - fused.rms_norm_torch(h, w, 1e-5).float()).abs().max() <= tol * want.abs().max() * 3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_and_mul(dtype, tol):
    gu = (torch.randn(5, 3, 2 * 48) * 4).to(dtype)
    got = torch.ops.loom.silu_and_mul(gu).float()
    want = fused.silu_and_mul_torch(gu.float())
    assert got.shape == (5, 3, 48)
    assert (got - want).abs().max() <= tol * want.abs().max()


def test_bf16_silu_and_mul_rounds_once_like_c10():
    """bf16 is computed in fp32 and rounded once to nearest-even (the bit-level conversions of kernels.h must
    agree with c10::BFloat16's), specials included."""
    g = torch.randn(64, 2 * 1536, generator=torch.Generator().manual_seed(3)) * 4
    g[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -0.0])
    gu = g.to(torch.bfloat16)
    got = torch.ops.loom.silu_and_mul(gu)
    gate, up = gu.float().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)  # one rounding, by c10
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs()  # exp_vec vs torch's exp: at most one bf16 ulp apart
    assert ((got.float() - want.float()).abs()[finite].nan_to_num() <= ulp[finite]).all()
    assert (got == want)[finite].float().mean() > 0.999


def test_rope_on_a_strided_view():
    qkv = torch.randn(7, 15, 64)
    x = qkv[:, :12]  # q and k heads of a fused projection: not contiguous
    cos, sin = torch.randn(7, 1, 64), torch.randn(7, 1, 64)
    assert (torch.ops.loom.rope(x, cos, sin) - fused.rope_torch(x, cos, sin)).abs().max() < 1e-5


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention(window, dtype):
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(50, 4, 2, 16, generator=g).to(dtype)
    vc = torch.randn(50, 4, 2, 16, generator=g).to(dtype)
    tables = torch.randint(0, 50, (6, 5), generator=g)
    lens = torch.tensor([1, 4, 5, 17, 20, 9])
    q = torch.randn(6, 6, 16, generator=g)
    got = paged_decode_attention_native(q, kc, vc, tables, lens, 0.25, window)
    want = paged_decode_attention_torch(q, kc.float(), vc.float(), tables, lens, 0.25, window)
    assert (got - want).abs().max() < (1e-5 if dtype == torch.float32 else 1e-4)
    # and against the definition, sequence by sequence
    for b in range(6):
        n = int(lens[b])
        k = kc.float()[tables[b]].reshape(-1, 2, 16)[:n].transpose(0, 1)
        v = vc.float()[tables[b]].reshape(-1, 2, 16)[:n].transpose(0, 1)
        ref = naive_attention(q[b][:, None], k, v, scale=0.25, window=window or None)[:, 0]
        assert (got[b] - ref).abs().max() < 1e-5


@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (128, 4, 2), (256, 4, 1)])
@pytest.mark.parametrize("window", [0, 7])
def test_paged_decode_attention_bf16_query(d, hq, hkv, window):
    """A bf16 query over bf16 caches (the bf16 model's decode; AVX512-BF16 where the CPU has it) against
    the definition in float64, for context lengths around the 16-token tiles, batched (one item per
    sequence) and alone (one item per KV head)."""
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(80, 16, hkv, d, generator=g).bfloat16()
    vc = torch.randn(80, 16, hkv, d, generator=g).bfloat16()
    lens = torch.tensor([1, 15, 16, 17, 33, 64, 5, 40, 2, 31])
    tables = torch.randperm(80, generator=g)[:40].view(10, 4)
    q = torch.randn(10, hq, d, generator=g).bfloat16()
    for rows in (slice(0, 10), slice(3, 4)):
        got = paged_decode_attention_native(q[rows], kc, vc, tables[rows], lens[rows], d ** -0.5, window)
        assert got.dtype == torch.bfloat16
        for i, b in enumerate(range(10)[rows]):
            n = int(lens[b])
            k = kc.double()[tables[b]].reshape(-1, hkv, d)[:n].transpose(0, 1).repeat_interleave(hq // hkv, 0)
            v = vc.double()[tables[b]].reshape(-1, hkv, d)[:n].transpose(0, 1).repeat_interleave(hq // hkv, 0)
            s = (q[b].double()[:, None] @ k.transpose(1, 2))[:, 0] * d ** -0.5
            if window:
                s[:, : max(0, n - window)] = -torch.inf
            want = (s.softmax(-1)[:, None] @ v)[:, 0]
            # fp32 accumulation, then one rounding to bf16: within one bf16 ulp of the exact value
            assert ((got[i].double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6).all()


def test_argmax_rows_is_torch_argmax():
    """First index of the maximum, NaN counting as the maximum, ties and all -inf rows included."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 1000, generator=g)
    x[1, 700] = x[1, 3] = 50.0  # a tie: the first wins
    x[2, 999] = 60.0  # the last element
    x[3, 0] = 60.0  # the first element
    x[4] = -torch.inf
    x[5, 400] = torch.nan
    x[5, 10] = 100.0
    x[6, 65] = torch.nan  # NaN in the second chunk, after a chunk with a finite maximum
    x[6, 900] = torch.nan
    x[7] = 3.0  # all equal
    x[8, 64] = torch.inf
    assert torch.equal(fused.argmax_rows(x), torch.argmax(x, dim=-1))
    y = torch.randn(5, 49152, generator=g)
    assert torch.equal(fused.argmax_rows(y), torch.argmax(y, dim=-1))
    odd = torch.randn(3, 7, generator=g)
    assert torch.equal(fused.argmax_rows(odd), torch.argmax(odd, dim=-1))
    # column-major logits (an output layer computed as W h^T), across the chunks the threads take
    wide = torch.randn(9, 10000, generator=g)
    wide[:4] = x[:4, :1].expand(4, 10000)  # all-equal rows: index 0
    wide[4, 9000] = wide[4, 5] = 99.0  # a tie across chunks
    wide[5, 8000] = torch.nan  # a NaN in a later chunk than the maximum
    wide[5, 100] = 98.0
    wide[6] = -torch.inf
    wide[7, 4096] = torch.inf
    cols = wide.t().contiguous().t()
    assert cols.stride() == (1, 9)
    assert torch.equal(fused.argmax_rows(cols), torch.argmax(wide, dim=-1))


def test_model_is_the_same_with_and_without_native(monkeypatch):
    from loom.config import ModelConfig
    from loom.models.transformer import Transformer

    model = Transformer(ModelConfig(vocab_size=99, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=96)).init_random(0, std=0.2)
    ids = torch.randint(0, 99, (12,))
    with torch.no_grad():
        with_native = model.logits(ids)
        monkeypatch.setattr(fused, "native_ops", lambda: False)
        without = model.logits(ids)
    assert (with_native - without).abs().max() < 1e-5


def test_silu_exp_is_accurate_across_the_float_range():
    """The kernel's own vectorizable exp: every gate from -100 to 100 within a few ulp of libm's."""
    g = torch.arange(-100.0, 100.0, 1e-3, dtype=torch.float64)
    gu = torch.cat([g, torch.ones_like(g)]).float().unsqueeze(0)
    got = torch.ops.loom.silu_and_mul(gu).double()
    want = torch.nn.functional.silu(g.float().double())
    assert torch.allclose(got, want, rtol=5e-7, atol=1e-30)


def test_extreme_values_behave_as_in_pytorch():
    gu = torch.tensor([[-1e30, 1e30, -100.0, 80.0, 1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(torch.ops.loom.silu_and_mul(gu), fused.silu_and_mul_torch(gu))
    x = torch.tensor([[1e30, -1e30, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    w = torch.ones(4)
    got, want = torch.ops.loom.rms_norm(x, w, 1e-5), fused.rms_norm_torch(x, w, 1e-5)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[1], want[1])


def _int8_cache(hkv: int, d: int, g: torch.Generator, blocks: int = 80, block_size: int = 16):
    """An int8 cache (layers/kv_quant.py) filled by the PyTorch twin from random keys and values."""
    from loom.layers.kv_quant import write_int8_torch

    kc = torch.zeros(blocks, block_size, hkv, d, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    ks = torch.rand(hkv, d, generator=g) * 0.05 + 0.01
    vs, vz = torch.zeros(blocks, block_size, hkv), torch.zeros(blocks, block_size, hkv)
    n = blocks * block_size
    k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g) * 2
    write_int8_torch(k, v, torch.arange(n), kc, vc, ks, vs, vz)
    return kc, vc, ks, vs, vz


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hkv", [(64, 3), (128, 2), (24, 2)])
def test_int8_kv_write_rounds_exactly_as_pytorch(dtype, d, hkv):
    """The native write quantizes as layers/kv_quant.py's twin does, code for code and scale for scale (a token
    written by a decode step or by a prefill must be the same token), including exact ties of the grid."""
    from loom.layers.kv_quant import write_int8_torch

    g = torch.Generator().manual_seed(3)
    n = 300
    k = torch.randn(n, hkv, d, generator=g).to(dtype)
    v = (torch.randn(n, hkv, d, generator=g) * torch.rand(n, 1, 1, generator=g) * 10).to(dtype)
    k[0, 0, :4] = torch.tensor([0.025, -0.075, 0.0, 1e9])  # ties on a 0.05 grid (round half to even), a clip
    v[1, 0] = 1.5  # a constant row: its range is 0
    ks = torch.full((hkv, d), 0.05)
    slots = torch.randperm(400, generator=g)[:n]
    got = [torch.zeros(25, 16, hkv, d, dtype=torch.int8), torch.zeros(25, 16, hkv, d, dtype=torch.int8),
           torch.zeros(25, 16, hkv), torch.zeros(25, 16, hkv)]
    want = [t.clone() for t in got]
    torch.ops.loom.int8_kv_write(k, v, slots, got[0], got[1], ks, got[2], got[3])
    write_int8_torch(k, v, slots, want[0], want[1], ks, want[2], want[3])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.loom.int8_kv_write(k[:1], v[:1], torch.tensor([400]), *got[:2], ks, *got[2:])


@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (128, 8, 2), (256, 4, 1), (40, 4, 2)])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_int8(d, hq, hkv, window, dtype):
    """Attention over the int8 cache without dequantizing it (the key scale folded into the query, the value
    scale into the weights; a head size the vectorized kernel does not take runs the portable one) against the
    definition, attention over the dequantized cache in float64: batched (one item per sequence) and alone (one
    item per KV head), for context lengths around the 16-token tiles. The vectorized kernel scores with the
    query rounded to int16 (a relative error of 2^-16 of its largest element): within 1e-4 of the outputs' scale."""
    from loom.layers.kv_quant import decode_attention_int8_torch

    g = torch.Generator().manual_seed(2)
    cache = _int8_cache(hkv, d, g)
    lens = torch.tensor([1, 15, 16, 17, 33, 64, 5, 40, 2, 31])
    tables = torch.randperm(80, generator=g)[:40].view(10, 4)
    q = torch.randn(10, hq, d, generator=g).to(dtype)
    for rows in (slice(0, 10), slice(3, 4)):
        got = torch.ops.loom.paged_decode_attention_int8(q[rows], *cache, tables[rows], lens[rows], d ** -0.5, window)
        assert got.dtype == dtype
        want = decode_attention_int8_torch(q[rows].double(), *(t.double() if t.is_floating_point() else t
                                                                for t in cache), tables[rows], lens[rows], d ** -0.5,
                                           window)
        err = (got.double() - want).abs()
        if dtype == torch.float32:
            assert err.max() <= 1e-4 * want.abs().max()
        else:  # then one rounding to bf16
            assert (err <= 2 ** -8 * want.abs() + 1e-4 * want.abs().max()).all()
