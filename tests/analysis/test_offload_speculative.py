"""Seed 002's offloading speed limit, and the speculative decoding formulas (Leviathan et al. 2211.17192)."""

from __future__ import annotations

import pytest

from loom.analysis.offload import offload_limit
from loom.analysis.speculative import best_k, estimate, expected_tokens, speedup


def test_seed002_offload_limit():
    """(7.7 GB - 3.5 GB) / 4 GB/s = 1.05 s per token; 1 / 1.05 = 0.95 tokens/s."""
    r = offload_limit(7.7e9, 3.5e9, 4e9)
    assert r.streamed_bytes == pytest.approx(4.2e9)
    assert r.latency_s == pytest.approx(1.05)
    assert round(r.tokens_per_s, 2) == 0.95


def test_offload_counts_kv_and_other_residents():
    # the seed's formula includes the KV cache: 7.7 + 0.4 - 3.5 = 4.6 GB per token
    assert offload_limit(7.7e9, 3.5e9, 4e9, kv_cache_bytes=0.4e9).latency_s == pytest.approx(1.15)
    # seed 002 keeps its 3.0 GB draft in the same 3.5 GB; counting it, 7.2 GB stream: 1.8 s per token
    assert offload_limit(7.7e9, 3.5e9, 4e9, resident_bytes=3.0e9).latency_s == pytest.approx(1.8)
    fits = offload_limit(3e9, 8e9, 4e9)
    assert fits.latency_s == 0 and fits.tokens_per_s is None
    with pytest.raises(ValueError):
        offload_limit(1e9, 1e9, 0)


def test_expected_tokens_is_the_mean_of_the_accepted_run():
    """(1 - a^(k+1)) / (1 - a) equals the mean of min(first rejection, k) + 1 under i.i.d. acceptance."""
    for a in (0.0, 0.3, 0.8, 0.99):
        for k in (0, 1, 4, 10):
            mean = sum((j + 1) * a**j * (1 - a) for j in range(k)) + (k + 1) * a**k
            assert expected_tokens(k, a) == pytest.approx(mean)
    assert expected_tokens(4, 1.0) == 5
    assert expected_tokens(0, 0.7) == 1


def test_speedup():
    # (1 - a^(k+1)) / ((1 - a)(k c + 1))
    assert speedup(4, 0.8, 0.1) == pytest.approx((1 - 0.8**5) / (0.2 * 1.4))
    assert speedup(3, 0.5, 0.0) == expected_tokens(3, 0.5)  # a free draft
    assert speedup(0, 0.5, 0.3) == 1  # no speculation
    assert speedup(4, 0.0, 0.1) < 1  # nothing accepted: pure overhead
    k = best_k(0.8, 0.1)
    assert all(speedup(k, 0.8, 0.1) >= speedup(j, 0.8, 0.1) for j in range(65))
    e = estimate(4, 0.8, 0.1)
    assert e.best_k == k and e.best_speedup >= e.speedup
    with pytest.raises(ValueError):
        expected_tokens(2, 1.5)
