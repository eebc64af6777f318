"""Measure this machine's limits: memory read bandwidth (the roof of batch-1 decode)."""

from __future__ import annotations

import time

import torch


def measure_memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of streaming reads: best of ``repeats`` torch sums over an fp32 buffer.

    Summing reads every byte once and writes almost nothing, like a GEMV at batch 1; the buffer
    (1 GiB by default) is far larger than any cache, so this is DRAM bandwidth.
    """
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best
