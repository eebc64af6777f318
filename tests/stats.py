"""Goodness-of-fit helpers for sampler tests (no scipy needed)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

Z_1E4 = 3.719016  # standard normal quantile at 1 - 1e-4


def chi2_critical(df: int, z: float = Z_1E4) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; with z = 3.719 the false-alarm rate
    of ``chi2_stat > chi2_critical`` under the null is 1e-4 per test."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(samples: Sequence[int], probs: dict[int, float]) -> tuple[float, int]:
    """Pearson's statistic of samples against expected probabilities (tokens with p = 0 must not appear)."""
    n = len(samples)
    counts = Counter(samples)
    assert all(probs.get(t, 0.0) > 0 for t in counts), f"sampled impossible tokens: {set(counts) - set(probs)}"
    stat = sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items() if p > 0)
    return stat, sum(1 for p in probs.values() if p > 0) - 1
