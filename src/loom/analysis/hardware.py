"""Measure this machine's limits: memory read bandwidth (the roof of batch-1 decode)."""

from __future__ import annotations

import time

from typing import Any, Callable

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


def cuda_median_seconds(fn: Callable[[], Any], repeats: int = 50, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure_device_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, repeats: int = 20) -> dict[str, float]:
    """A GPU's memory bandwidth, timed with CUDA events (median of ``repeats`` after warm-up).

    ``copy``: a device-to-device copy of ``nbytes``, counting bytes read plus bytes written (the
    usual "measured bandwidth" figure); ``read``: a sum over the same buffer, bytes read only (what a
    batch-1 GEMV does). The buffer (1 GiB) is far larger than the L2 cache. Random data, not zeros.
    """
    dev = torch.device(device)
    src = torch.rand(nbytes // 4, device=dev)
    dst = torch.empty_like(src)

    copy_s = cuda_median_seconds(lambda: dst.copy_(src), repeats)
    read_s = cuda_median_seconds(lambda: src.sum(), repeats)
    return {"copy": 2 * src.nbytes / copy_s, "read": src.nbytes / read_s}
