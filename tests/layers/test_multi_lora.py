"""Multi-LoRA products (layers/multi_lora.py): loom's native ``lora_add_`` (native/lora.cpp) and the PyTorch
twin ``add_lora_torch`` both compute ``add_lora_reference``, the fp64 definition, for decode-sized batches
(the vectorized per-group kernel), many rows of one adapter (its GEMM path), fused linears of uneven parts,
rows without an adapter, and ranks from 1 to past the kernel's widest vector tile."""

from __future__ import annotations

import pytest
import torch

from loom.layers import fused
from loom.layers.multi_lora import LoraWeights, add_lora, add_lora_reference, add_lora_torch

native = pytest.mark.skipif(not fused.native_ops(), reason="loom's native kernels are not built (LOOM_NATIVE=0 or no compiler)")
QKV = [64, 32, 32]  # q | k | v of uneven sizes


def _pool(parts: list[int], rank: int, fan_in: int, slots: int = 4, seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    cols = [0]
    for p in parts:
        cols.append(cols[-1] + p)
    return LoraWeights(torch.randn(slots, len(parts) * rank, fan_in, generator=g) / fan_in ** 0.5,
                       torch.randn(slots, cols[-1], rank, generator=g) / rank ** 0.5, cols)


def _inputs(w: LoraWeights, slots: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(slots)
    return (torch.randn(n, w.cols[-1], generator=g), torch.randn(n, w.a.shape[2], generator=g),
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
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = torch.ops.loom.lora_add_(y.clone(), x, w.a, w.b, s, w.cols)
    finally:
        torch.set_num_threads(before)
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
    ("x rows", r"x must be fp32 CPU \[rows, in\] with y's 3 rows"),
    ("slots length", r"slots must be an integer \[rows\] tensor of 3 slots"),
    ("y dtype", r"y must be a contiguous fp32 CPU \[rows, out\] tensor"),
    ("slot counts", r"a has 4 slots but b has 3"),
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
    elif case == "slot counts":
        b = b[:3].contiguous()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.loom.lora_add_(y, x, a, b, s, cols)
