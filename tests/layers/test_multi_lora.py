"""Multi-LoRA products (layers/multi_lora.py): loom's native ``lora_add_`` (native/lora.cpp) and the PyTorch
twin ``add_lora_torch`` both compute ``add_lora_reference``, the fp64 definition, for decode-sized batches
(the vectorized per-group kernel), many rows of one adapter (its GEMM path), fused linears of uneven parts,
rows without an adapter, and ranks from 1 to past the kernel's widest vector tile; with the pool in fp32 or bf16
(vLLM's --lora-dtype) and the activations in fp32 or bf16, every pairing."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

from loom.layers import fused
from loom.layers.multi_lora import LoraWeights, add_lora, add_lora_reference, add_lora_torch

native = pytest.mark.skipif(not fused.native_ops(), reason="loom's native kernels are not built (LOOM_NATIVE=0 or no compiler)")
QKV = [64, 32, 32]  # q | k | v of uneven sizes


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pool(parts: list[int], rank: int, fan_in: int, slots: int = 4, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    cols = [0]
    for p in parts:
        cols.append(cols[-1] + p)
    return LoraWeights((torch.randn(slots, len(parts) * rank, fan_in, generator=g) / fan_in ** 0.5).to(dtype),
                       (torch.randn(slots, cols[-1], rank, generator=g) / rank ** 0.5).to(dtype), cols)


def _inputs(w: LoraWeights, slots: list[int], seed: int = 1,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(slots)
    return (torch.randn(n, w.cols[-1], generator=g).to(dtype), torch.randn(n, w.a.shape[2], generator=g).to(dtype),
            torch.tensor(slots, dtype=torch.long))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def _check(w: LoraWeights, slots: list[int], native_too: bool = True) -> None:
    y, x, s = _inputs(w, slots)
    want = add_lora_reference(y, x, w, s)
    assert (want != y).any() or all(v < 0 for v in slots)
    _close(add_lora_torch(y.clone(), x, w, s), want)
    if native_too and fused.native_ops():
        got = y.clone()
        out = torch.ops.loom.lora_add_(got, x, w.a, w.b, s, w.cols)
        assert out.data_ptr() == got.data_ptr()  # in place, and returns y
        _close(got, want)


DECODE_SLOTS = {
    "mixed": [2, -1, 0, 2, 3, -1, 1],
    "one slot": [1] * 6,
    "one row": [3],
    "fifteen rows, three slots": [i % 3 for i in range(15)],  # groups of 5: the transposed expand
}


@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("parts", [[48], QKV], ids=["one part", "q|k|v"])
@pytest.mark.parametrize("slots", list(DECODE_SLOTS.values()), ids=list(DECODE_SLOTS))
def test_decode_batches_equal_the_definition(slots, parts, rank):
    _check(_pool(parts, rank, 40), slots)


@pytest.mark.parametrize("rank", [3, 24, 72])  # a partial vector of ranks, two vectors, past the widest tile (64)
def test_other_ranks_and_inputs_not_a_multiple_of_the_vector(rank):
    _check(_pool([17, 5, 30], rank, 45), [0, 1, -1, 1, 2, 2, 2, 0])


MANY_ROWS = {
    "segments": [-1] * 20 + [0] * 100 + [2] * 90 + [1] * 10,  # prefill chunks: contiguous rows, one small group
    "interleaved": [i % 4 for i in range(256)],                 # every group scattered over the batch
    "mixed sizes": [3 if i % 9 == 0 else (i % 2 if i % 3 else -1) for i in range(240)],
}


@pytest.mark.parametrize("parts", [[48], QKV], ids=["one part", "q|k|v"])
@pytest.mark.parametrize("slots", list(MANY_ROWS.values()), ids=list(MANY_ROWS))
def test_many_rows_take_the_gemm_path_and_equal_the_definition(slots, parts):
    _check(_pool(parts, 16, 64), slots)


def test_rows_without_adapters_are_untouched():
    w = _pool(QKV, 8, 40)
    y, x, s = _inputs(w, [-1, -1, -1])
    assert torch.equal(add_lora_torch(y.clone(), x, w, s), y)
    if fused.native_ops():
        assert torch.equal(torch.ops.loom.lora_add_(y.clone(), x, w.a, w.b, s, w.cols), y)


@native
def test_add_lora_runs_the_native_kernel_on_fp32_cpu_tensors():
    w = _pool(QKV, 8, 40)
    y, x, s = _inputs(w, [0, -1, 3])
    want = add_lora_reference(y, x, w, s)
    got = y.clone()
    assert add_lora(got, x.t().contiguous().t(), w, s) is got  # in place; a non-contiguous x is made contiguous
    _close(got, want)


@native
def test_threads_split_the_work_the_same_way():
    w = _pool([300, 200], 16, 128)
    slots = [0, 1, 2, 3, -1, 0, 1, 1, 2] * 3  # enough work for the parallel region
    y, x, s = _inputs(w, slots)
    want = add_lora_reference(y, x, w, s)
    with _threads(2):
        got = torch.ops.loom.lora_add_(y.clone(), x, w.a, w.b, s, w.cols)
    _close(got, want)


@native
@pytest.mark.parametrize("case, match", [
    ("slot too high", r"slot 4 of row 1 out of range \[-1, 4\)"),
    ("slot below -1", r"slot -2 of row 0 out of range"),
    ("cols not ending at out", r"cols must be the parts' column offsets from 0 to y's 128 columns"),
    ("cols decreasing", r"cols must not decrease"),
    ("a rows", r"a has 24 rows per slot, expected parts \* rank = 2 \* 8 = 16"),
    ("b outputs", r"b has 96 output rows but y has 128 columns"),
    ("x inputs", r"a takes 40 inputs but x has 39"),
    ("x rows", r"x must be a CPU \[rows, in\] tensor of y's dtype \(Float\) and y's 3 rows"),
    ("slots length", r"slots must be an integer \[rows\] tensor of 3 slots"),
    ("y dtype", r"y must be a contiguous fp32 or bf16 CPU \[rows, out\] tensor, got Double"),
    ("y fp16", r"y must be a contiguous fp32 or bf16 CPU \[rows, out\] tensor, got Half"),
    ("x dtype not y's", r"x must be a CPU \[rows, in\] tensor of y's dtype \(Float\) and y's 3 rows, got BFloat16"),
    ("slot counts", r"a has 4 slots but b has 3"),
    ("a and b dtypes differ", r"a and b must both be fp32 or both bf16, got BFloat16 and Float"),
    ("fp16 pool", r"a and b must both be fp32 or both bf16, got Half and Half"),
])
def test_bad_shapes_get_clear_errors(case, match):
    w = _pool(QKV, 8, 40)
    y, x, s = _inputs(w, [0, 1, 2])
    a, b, cols = w.a, w.b, list(w.cols)
    if case == "slot too high":
        s = torch.tensor([0, 4, 1])
    elif case == "slot below -1":
        s = torch.tensor([-2, 0, 1])
    elif case == "cols not ending at out":
        cols = [0, 64, 96, 127]
    elif case == "cols decreasing":
        cols = [0, 96, 64, 128]
    elif case == "a rows":
        cols = [0, 64, 128]
    elif case == "b outputs":
        b = b[:, :96].contiguous()
    elif case == "x inputs":
        x = x[:, :39]
    elif case == "x rows":
        x = x[:2]
    elif case == "slots length":
        s = s[:2]
    elif case == "y dtype":
        y = y.double()
    elif case == "y fp16":
        y, x = y.half(), x.half()
    elif case == "x dtype not y's":
        x = x.bfloat16()
    elif case == "slot counts":
        b = b[:3].contiguous()
    elif case == "a and b dtypes differ":
        a = a.bfloat16()
    elif case == "fp16 pool":
        a, b = a.half(), b.half()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.loom.lora_add_(y, x, a, b, s, cols)


# bf16 pools and activations --------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMBOS = [(act, pool) for act in DTYPES for pool in DTYPES]  # fp32 rows with a bf16 pool: the native int4 models'


def _check_dtypes(w: LoraWeights, slots: list[int], act: torch.dtype, threads: int = 1) -> None:
    """The native op, add_lora and the twin against add_lora_reference, for x / y in ``act`` and the pool as it is.

    The reference works in fp64 from the weights as stored, so the only errors left are fp32 summation and, for
    bf16 y, its rounding: the native op rounds y + B A x once (within half a bf16 unit of the exact sum), the
    reference and the twin round the product and then the sum."""
    y, x, s = _inputs(w, slots, dtype=act)
    want = add_lora_reference(y, x, w, s)
    exact = add_lora_reference(y.double(), x.double(), w, s)  # the fp64 sum itself, unrounded
    assert want.dtype == act and (want != y).any()
    scale = exact.abs().max()
    base = torch.tensor(slots) < 0
    with _threads(threads):
        got = y.clone()
        assert torch.ops.loom.lora_add_(got, x, w.a, w.b, s, w.cols) is not None
    assert got.dtype == act
    assert torch.equal(got[base], y[base])  # rows without an adapter: untouched
    if act == torch.float32:
        _close(got, want)
    else:
        assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()
        err = (got.double() - exact).abs()
        assert (err <= 2.0 ** -8 * exact.abs() + 1e-5 * scale).all()  # rounded once, to nearest
    via = y.clone()
    assert add_lora(via, x, w, s) is via and torch.equal(via, got)  # add_lora runs the native op for every pairing
    twin = add_lora_torch(y.clone(), x, w, s)
    assert twin.dtype == act
    rel = 1e-5 if act == torch.float32 else 1e-2
    assert (twin.double() - exact).abs().max() <= rel * scale


@native
@pytest.mark.parametrize("act, pool", COMBOS, ids=[f"x {a}, pool {p}" for a, p in COMBOS])
@pytest.mark.parametrize("parts", [[48], QKV], ids=["one part", "q|k|v"])
@pytest.mark.parametrize("slots", list(DECODE_SLOTS.values()) + list(MANY_ROWS.values()),
                         ids=list(DECODE_SLOTS) + list(MANY_ROWS))
def test_every_dtype_pairing_equals_the_definition(slots, parts, act, pool):
    """Decode batches (the vectorized kernels) and 220-256 rows (the GEMM path), rank 16."""
    _check_dtypes(_pool(parts, 16, 64, dtype=DTYPES[pool]), slots, DTYPES[act])


@native
@pytest.mark.parametrize("act, pool", COMBOS, ids=[f"x {a}, pool {p}" for a, p in COMBOS])
@pytest.mark.parametrize("rank", [3, 24, 72])  # partial vector, two vectors, past the widest tile (scalar expand)
def test_bf16_at_other_ranks_and_odd_sizes(rank, act, pool):
    _check_dtypes(_pool([17, 5, 30], rank, 45, dtype=DTYPES[pool]), [0, 1, -1, 1, 2, 2, 2, 0] + [3] * 40,
                  DTYPES[act])


@native
@pytest.mark.parametrize("act, pool", COMBOS, ids=[f"x {a}, pool {p}" for a, p in COMBOS])
def test_bf16_threads_split_the_work_the_same_way(act, pool):
    w = _pool([300, 200], 16, 128, dtype=DTYPES[pool])
    slots = [0, 1, 2, 3, -1, 0, 1, 1, 2] * 3
    y, x, s = _inputs(w, slots, dtype=DTYPES[act])
    one = torch.ops.loom.lora_add_(y.clone(), x, w.a, w.b, s, w.cols)
    _check_dtypes(w, slots, DTYPES[act], threads=2)
    with _threads(2):
        two = torch.ops.loom.lora_add_(y.clone(), x, w.a, w.b, s, w.cols)
    assert torch.equal(one, two)  # each output summed by one thread, in the same order


def test_the_twin_widens_a_bf16_pool_for_fp32_rows():
    """fp32 rows with a bf16 pool: the twin multiplies the stored bf16 weights exactly in fp32 (no rounding of x);
    a pool whose A and B differ in dtype, or an fp16 pool, still works through the twin (add_lora's fallback)."""
    w = _pool(QKV, 8, 40, dtype=torch.bfloat16)
    y, x, s = _inputs(w, [0, -1, 3, 3])
    _close(add_lora_torch(y.clone(), x, w, s), add_lora_reference(y, x, w, s))
    for odd in (LoraWeights(w.a.float(), w.b, w.cols), LoraWeights(w.a.half(), w.b.half(), w.cols)):
        _close(add_lora(y.clone(), x, odd, s), add_lora_reference(y, x, odd, s))


@native
def test_bf16_rounding_is_to_nearest_even_and_keeps_nan_and_inf():
    """y is rounded once, as torch rounds fp32 to bf16: ties to even, inf and NaN kept."""
    w = LoraWeights(torch.ones(1, 1, 1, dtype=torch.bfloat16), torch.ones(1, 4, 1, dtype=torch.bfloat16), [0, 4])
    # 1 + 2^-8 is a tie between 1 and 1 + 2^-7 (to even: 1); 1 + 3 * 2^-8 rounds up to 1 + 2^-6
    for delta, y0 in ((2.0 ** -8, 1.0), (3 * 2.0 ** -8, 1.0), (1.0, float("inf")), (1.0, float("nan")), (2.0 ** -9, -1.0)):
        y = torch.full((1, 4), y0, dtype=torch.bfloat16)
        x = torch.tensor([[delta]]).bfloat16()
        assert float(x) == delta
        want = (torch.full((1, 4), y0) + delta).bfloat16()
        got = torch.ops.loom.lora_add_(y, x, w.a, w.b, torch.tensor([0]), w.cols)
        assert torch.equal(got.float().nan_to_num(7.0), want.float().nan_to_num(7.0))


@native
@pytest.mark.parametrize("act", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("slots", [DECODE_SLOTS["mixed"], MANY_ROWS["segments"], MANY_ROWS["interleaved"]],
                         ids=["decode", "segments", "interleaved"])
def test_a_bf16_pool_is_the_fp32_pool_of_its_values(slots, act):
    """bf16 weights are widened exactly and then summed as fp32 weights are, in both paths: bit for bit equal."""
    w = _pool(QKV, 16, 64, dtype=torch.bfloat16)
    wide = LoraWeights(w.a.float(), w.b.float(), w.cols)
    y, x, s = _inputs(w, slots, dtype=act)
    half = torch.ops.loom.lora_add_(y.clone(), x, w.a, w.b, s, w.cols)
    assert torch.equal(half, torch.ops.loom.lora_add_(y.clone(), x, wide.a, wide.b, s, w.cols))
