"""Seed 002's offloading speed limit, and the speculative decoding formulas (Leviathan et al. 2211.17192)."""

from __future__ import annotations

import pytest

from loom.analysis.offload import (acceptance_estimate, choose_speculative_tokens, offload_limit,
                                   speculation_tokens_per_s)
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


def test_choose_k_against_hand_computed_rates():
    """a = 0.5, a 1 s read per pass, 0.1 s per draft step: k = 1, 2, 3 give 1.5 / 1.1 = 1.364, 1.75 / 1.2 = 1.458,
    1.875 / 1.3 = 1.442 tokens/s, so k = 2."""
    c = choose_speculative_tokens(1e9, 1e9, acceptance=0.5, draft_step_s=0.1)
    assert c.k == 2 and c.pass_read_s == pytest.approx(1.0)
    assert c.expected_tokens_per_pass == pytest.approx(1.75) and c.tokens_per_s == pytest.approx(1.75 / 1.2)
    assert c.plain_tokens_per_s == pytest.approx(1.0)
    assert speculation_tokens_per_s(3, 0.5, 1.0, 0.1) == pytest.approx(1.875 / 1.3)
    # the target's own compute adds to every pass: 0.5 s more makes drafting cheaper relative to it:
    # k = 3: 1.875 / 1.8 = 1.042 beats k = 2: 1.75 / 1.7 = 1.029 and k = 4: 1.9375 / 1.9 = 1.020
    assert choose_speculative_tokens(1e9, 1e9, 0.5, 0.1, target_compute_s=0.5).k == 3


def test_choose_k_limits():
    # nothing is ever accepted: every k yields one token, and drafting only costs, so the smallest k
    assert choose_speculative_tokens(1e9, 1e9, 0.0, 0.01).k == 1
    assert choose_speculative_tokens(1e9, 1e9, 0.0, 0.01, k_min=0).k == 0
    # everything accepted and free drafts: as many as allowed
    assert choose_speculative_tokens(1e9, 1e9, 1.0, 0.0, k_max=7).k == 7
    # a slow read makes drafts cheap: a = 0.9, 10 s per pass, 1 ms drafts -> k_max (1 - 0.9^17) / 0.1 = 8.33
    c = choose_speculative_tokens(4e10, 4e9, 0.9, 0.001)
    assert c.k == 16 and c.expected_tokens_per_pass == pytest.approx((1 - 0.9**17) / 0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        choose_speculative_tokens(1e9, 0, 0.5, 0.1)
    with pytest.raises(ValueError, match="k_min"):
        choose_speculative_tokens(1e9, 1e9, 0.5, 0.1, k_min=3, k_max=2)


def test_acceptance_estimate_is_the_censored_geometric_mle():
    # 7 drafts accepted, 3 passes ended at a rejection: 7 / 10 without a prior
    assert acceptance_estimate(7, 3, prior_weight=0) == pytest.approx(0.7)
    # with the prior 0.6 as 2 pseudo-counts: (7 + 1.2) / 12
    assert acceptance_estimate(7, 3) == pytest.approx(8.2 / 12)
    assert acceptance_estimate(0, 0) == pytest.approx(0.6)
    assert acceptance_estimate(0, 0, prior=0.3, prior_weight=0) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        acceptance_estimate(-1, 0)
