"""Every attention kernel equals the naive formula; the paged cache's scatter/gather round-trips."""

from __future__ import annotations

import math

import pytest
import torch

from loom.layers.kernels import (SlotWrites, flash_attention, gather_kv, naive_attention, paged_decode_attention,
                                 sdpa_attention, split_kv_attention, visibility_mask, write_kv)
from loom.layers.position import alibi_bias, alibi_slopes


def reference(q, k, v, window=None, bias=None, causal=True):
    """The definition, one query at a time, in float64."""
    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    out = torch.zeros(hq, tq, v.shape[-1], dtype=torch.float64)
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(tq):
            pos = tk - tq + i
            scores = []
            for j in range(tk):
                visible = (not causal) or (j <= pos and (window is None or j > pos - window))
                if visible:
                    s = float(q[h, i].double() @ k[kv, j].double()) / math.sqrt(d)
                    if bias is not None:
                        s += float(bias[h, i, j])
                    scores.append((s, j))
            if scores:
                m = max(s for s, _ in scores)
                z = sum(math.exp(s - m) for s, _ in scores)
                for s, j in scores:
                    out[h, i] += math.exp(s - m) / z * v[kv, j].double()
    return out


CASES = [  # (hq, hkv, tq, tk, window)
    (4, 4, 5, 5, None),   # MHA prefill
    (6, 2, 7, 7, None),   # GQA prefill
    (4, 1, 3, 3, None),   # MQA
    (6, 3, 1, 9, None),   # decode
    (6, 3, 4, 11, None),  # prefill with a cached prefix
    (4, 2, 9, 9, 3),      # sliding window
    (4, 2, 2, 10, 4),     # window + cached prefix
]


@pytest.mark.parametrize("hq,hkv,tq,tk,window", CASES)
def test_naive_matches_definition(hq, hkv, tq, tk, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, t, 8, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    torch.testing.assert_close(naive_attention(q, k, v, window=window).double(), reference(q, k, v, window),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv,tq,tk,window", CASES)
@pytest.mark.parametrize("tile", [1, 3, 4, 64])
def test_flash_and_split_kv_match_naive(hq, hkv, tq, tk, window, tile):
    g = torch.Generator().manual_seed(tile)
    q, k, v = (torch.randn(h, t, 16, generator=g) * 3 for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    want = naive_attention(q, k, v, window=window)
    got = flash_attention(q, k, v, window=window, block_q=tile, block_k=tile)
    assert (got - want).abs().max() <= 1e-5
    for splits in (1, 2, 3, 7):
        got = split_kv_attention(q, k, v, window=window, num_splits=splits, block_k=tile)
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("hq,hkv,tq,tk,window", CASES)
def test_sdpa_matches_naive(hq, hkv, tq, tk, window):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(h, t, 16, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    assert (sdpa_attention(q, k, v, window=window) - naive_attention(q, k, v, window=window)).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel", [naive_attention, flash_attention, split_kv_attention, sdpa_attention])
def test_alibi_bias_and_non_causal(kernel):
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(8, 5, 8, generator=g), torch.randn(8, 9, 8, generator=g), torch.randn(8, 9, 8, generator=g)
    bias = alibi_bias(alibi_slopes(8), torch.arange(4, 9), torch.arange(9))
    want = reference(q, k, v, bias=bias)
    assert (kernel(q, k, v, bias=bias).double() - want).abs().max() <= 1e-5
    want = reference(q, k, v, causal=False)
    assert (kernel(q, k, v, causal=False).double() - want).abs().max() <= 1e-5


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    bias = torch.zeros(2, 3, 5)
    bias[:, 1, :] = float("-inf")  # query 1 sees nothing
    for kernel in (naive_attention, flash_attention, split_kv_attention):
        out = kernel(q, k, v, bias=bias, block_k=2) if kernel is not naive_attention else kernel(q, k, v, bias=bias)
        assert not torch.isnan(out).any()
        assert torch.equal(out[:, 1], torch.zeros(2, 4))


def test_visibility_mask():
    m = visibility_mask(2, 5, window=2)
    assert m.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def test_paged_write_and_gather_roundtrip():
    g = torch.Generator().manual_seed(3)
    num_blocks, hkv, bs, d = 8, 2, 4, 3
    kc, vc = torch.zeros(num_blocks, bs, hkv, d), torch.zeros(num_blocks, bs, hkv, d)
    table = [5, 1, 6]  # logical block i lives in physical block table[i]
    n = 10
    k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    slots = torch.tensor([table[i // bs] * bs + i % bs for i in range(n)])
    write_kv(kc, vc, k, v, SlotWrites.plan(slots))
    assert torch.equal(gather_kv(kc, table, n), k.transpose(0, 1))
    assert torch.equal(gather_kv(vc, table, n), v.transpose(0, 1))
    # One more token through the slice path (consecutive slots).
    k1 = torch.randn(1, hkv, d, generator=g)
    plan = SlotWrites.plan(torch.tensor([table[2] * bs + 2]))
    assert plan.slots is None and (plan.start, plan.end) == (26, 27)
    write_kv(kc, vc, k1, k1, plan)
    assert torch.equal(gather_kv(kc, table, n + 1)[:, n], k1[0])
    # Padding slots (-1) are skipped.
    before = kc.clone()
    write_kv(kc, vc, torch.randn(2, hkv, d), torch.randn(2, hkv, d), SlotWrites.plan(torch.tensor([-1, -1])))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("window", [0, 3])
def test_paged_decode_attention_equals_per_sequence(window):
    g = torch.Generator().manual_seed(4)
    num_blocks, bs, hkv, hq, d = 20, 4, 2, 6, 8
    kc, vc = torch.randn(num_blocks, bs, hkv, d, generator=g), torch.randn(num_blocks, bs, hkv, d, generator=g)
    tables = [[3, 7, 1], [0], [12, 5], [9, 2, 4, 19]]
    lens = [10, 2, 8, 13]
    q = torch.randn(len(tables), hq, d, generator=g)
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    got = paged_decode_attention(q, kc, vc, padded, torch.tensor(lens), 0.3, window)
    for i, (t, n) in enumerate(zip(tables, lens)):
        k, v = gather_kv(kc, t, n), gather_kv(vc, t, n)
        want = naive_attention(q[i][:, None], k, v, scale=0.3, window=window or None)[:, 0]
        assert (got[i] - want).abs().max() < 1e-5
    # one sequence in one contiguous block: the view path
    one = paged_decode_attention(q[:1], kc, vc, torch.tensor([[7]]), torch.tensor([3]), 0.3, window)
    want = naive_attention(q[0][:, None], gather_kv(kc, [7], 3), gather_kv(vc, [7], 3), scale=0.3,
                           window=window or None)[:, 0]
    assert (one[0] - want).abs().max() < 1e-5
