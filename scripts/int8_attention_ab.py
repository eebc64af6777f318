"""Paged decode attention over a bf16 cache against the int8 cache (native kernels), alternating calls.

    python scripts/int8_attention_ab.py [--seqs 64] [--context 192] [--calls 20] [--warm]

SmolLM2-135M's shape (9 query heads, 3 KV heads of 64), ``--seqs`` sequences of ``--context`` tokens in
scattered 16-token blocks; by default a 64 MB buffer is written between calls so each reads its cache from DRAM,
as a decode step's 30 layers do (``--warm``: cache-resident, compute-bound). Realistic scales: keys of order one,
so the scores stay within a few units. Prints the median and best milliseconds of each as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loom.layers import fused


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--warm", action="store_true")
    args = ap.parse_args()
    if not fused.native_ops():
        raise SystemExit("loom's native kernels are not built")
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, bs = args.seqs, 9, 3, 64, 16
    per = -(-args.context // bs)
    blocks = b * per + 8
    lens = torch.full((b,), args.context)
    tables = torch.randperm(blocks, generator=g)[:b * per].view(b, per)
    kb = torch.randn(blocks, bs, hkv, d, generator=g).bfloat16()
    vb = torch.randn(blocks, bs, hkv, d, generator=g).bfloat16()
    ki = torch.randint(-127, 128, (blocks, bs, hkv, d), generator=g, dtype=torch.int8)
    vi = torch.randint(-128, 128, (blocks, bs, hkv, d), generator=g, dtype=torch.int8)
    ks = torch.rand(hkv, d, generator=g) * 0.02 + 0.005
    vs, vz = torch.rand(blocks, bs, hkv, generator=g) * 0.02, torch.randn(blocks, bs, hkv, generator=g) * 0.1
    q = torch.randn(b, hq, d, generator=g).bfloat16()
    calls = {"bf16": lambda: torch.ops.loom.paged_decode_attention(q, kb, vb, tables, lens, 0.125, 0),
             "int8": lambda: torch.ops.loom.paged_decode_attention_int8(q, ki, vi, ks, vs, vz, tables, lens, 0.125, 0)}
    junk = torch.empty(64 * 2**20, dtype=torch.uint8)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, f in calls.items():
            if not args.warm:
                junk.add_(1)
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    print(json.dumps({"seqs": b, "context": args.context, "threads": torch.get_num_threads(), "warm": args.warm,
                      **{name: {"median_ms": statistics.median(t) * 1e3, "best_ms": min(t) * 1e3}
                         for name, t in times.items()}}, indent=2))


if __name__ == "__main__":
    main()
