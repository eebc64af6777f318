"""Measure this machine's roofline: streaming memory bandwidth and dense matmul FLOP/s."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loom.analysis.hardware import measure_memory_bandwidth
from loom.analysis.presets import Hardware
from loom.device import synchronize


def measure_gemv_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second a matrix-vector product streams: W [rows x cols] fp32 @ x, best of ``repeats``.

    This is batch-1 decode's access pattern (every weight read once per token); on some machines it
    reads faster than ``measure_memory_bandwidth``'s reduction, so the probe takes the faster of the two.
    """
    cols = 4096
    rows = max(1, nbytes // 4 // cols)
    w = torch.ones(rows, cols, dtype=torch.float32)
    x = torch.ones(cols, dtype=torch.float32)
    torch.mv(w, x)  # touch every page once before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mv(w, x)
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best


def measure_matmul_flops(size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5,
                         device: str | torch.device = "cpu") -> float:
    """FLOP/s of a square [size x size] @ [size x size] matmul (2 size^3 FLOPs) on ``device``, best of ``repeats``."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up: threads, caches, kernel selection
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def measure_packed_matmul_flops(size: int = 1024, kind: str = "bfloat16", repeats: int = 5) -> float:
    """FLOP/s (int8: OP/s) of a [size x size] x [size x size] product on the CPU with the weight pre-packed once
    in oneDNN's blocked layout, as loom's packed linears run it: "bfloat16" (AMX / AVX512-BF16), "float32",
    or "int8" (int8 x int8 -> int32, AMX-INT8 / VNNI). Best of ``repeats``. A plain ``torch.mm`` reorders
    its operand on every call, which on this machine kind measured half the packed rate."""
    no_args: list[Any] = []
    if kind == "int8":
        w = torch.randint(-127, 128, (size, size), dtype=torch.int8)
        x = torch.randint(-127, 128, (size, size), dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        scales, zeros = torch.ones(size), torch.zeros(size, dtype=torch.long)

        def run() -> torch.Tensor:
            return torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                                      "none", no_args, "")
    else:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[kind]
        w, x = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, size)

        def run() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", no_args, "")
    for _ in range(3):  # oneDNN builds its kernel on the first call; the matrix units warm up
        run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


@dataclass
class ProbeResult:
    bandwidth: float  # bytes/s, streaming reads: the faster of a reduction and a GEMV
    bandwidth_sum: float
    bandwidth_gemv: float
    matmul_flops: float  # FLOP/s, fp32 GEMM
    bandwidth_buffer_bytes: int
    matmul_size: int
    threads: int
    cpu: str

    def hardware(self) -> Hardware:
        return Hardware("this machine (measured)", self.bandwidth, {"fp32": self.matmul_flops},
                        note=f"{self.cpu}, {self.threads} threads; bandwidth: best of sum / GEMV over "
                             f"{self.bandwidth_buffer_bytes / 2**20:.0f} MiB, FLOP/s: fp32 {self.matmul_size}^3 matmul")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ridge_flop_per_byte"] = self.matmul_flops / self.bandwidth
        return d


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(buffer_bytes: int = 256 << 20, matmul_size: int = 1024, repeats: int = 10) -> ProbeResult:
    """This machine's memory bandwidth (fastest streaming read of ``buffer_bytes``) and fp32 matmul FLOP/s.

    Best of ``repeats`` short runs: on a shared machine a short run is likelier to find the cores free,
    and the roof is what the machine can do, not what it did while busy. 256 MiB is far beyond any
    last-level cache; a 1024^3 matmul (12 MiB of operands) measures compute, not DRAM.
    """
    if buffer_bytes < 4096 or matmul_size < 1 or repeats < 1:
        raise ValueError("buffer must be >= 4 KiB, matmul size and repeats >= 1")
    bw_sum = measure_memory_bandwidth(buffer_bytes, repeats)
    bw_gemv = measure_gemv_bandwidth(buffer_bytes, repeats)
    flops = measure_matmul_flops(matmul_size, repeats=repeats)
    return ProbeResult(max(bw_sum, bw_gemv), bw_sum, bw_gemv, flops, buffer_bytes, matmul_size, torch.get_num_threads(),
                       f"{_cpu_name()} ({os.cpu_count()} cores)")
