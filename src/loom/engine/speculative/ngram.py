"""Prompt lookup (n-gram) proposals: no draft model, just the sequence's own history.

For n from ``max_n`` down to ``min_n``: find the latest earlier occurrence of the last n tokens and
propose the (up to k) tokens that followed it. Text that copies from its context (rewriting,
summarizing, code edits, retrieval answers) repeats long spans, so the continuation of the last
match is often right; open-ended text rarely repeats and the proposal is then empty (the sequence
decodes normally that step, at no cost).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def ngram_lookup(tokens: Sequence[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to ``k`` tokens continuing the latest earlier occurrence of the longest matching suffix."""
    length = len(tokens)
    if k < 1 or length < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = arr[length - n:]
        # Candidate starts j <= length - n - 1, so the match is earlier than the suffix itself and at
        # least one token follows it.
        windows = sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            j = int(hits[-1])
            return arr[j + n: j + n + k].tolist()
    return []


class NgramProposer:
    """Deterministic drafts (the rejection sampler treats them as one-hot q)."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        return ngram_lookup(tokens, k, self.max_n, self.min_n)
