"""Time one decode step of the default model, native (C++) vs scripted (TorchScript), at several batch sizes.

    python scripts/decode_step_timing.py [--weights native|fp32] [--batches 1,2,4,8,16,32] [--steps 100]

Calls the runner's native and scripted steps (engine/step/) directly (no scheduler or sampler), each sequence at a context of 40-60 tokens,
and prints milliseconds per step for each path and the ratio (docs/RESULTS.md, "Batch-1 decode with
the native decode step").
"""

from __future__ import annotations

import argparse
import time

import torch

from loom import LLM
from loom.engine.step import DecodeBatch
from loom.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="native")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    llm = LLM(weights=args.weights)
    steps = {name: llm.engine.runner.step(name) for name in ("scripted", "native")}
    steps["native"].max_batch = max(steps["native"].max_batch, 64)  # time the native step at every size asked for
    llm.generate([list(range(100, 132))], SamplingParams(max_tokens=1, temperature=0.0))  # builds, warms up
    for b in (int(x) for x in args.batches.split(",")):
        tables = torch.tensor([[0, 1, 2, 3]] * b)  # every row reads the same 4 blocks: a context of up to 64

        def batch(pos: int) -> DecodeBatch:
            p = torch.tensor([pos] * b)
            return DecodeBatch(torch.tensor([5] * b), p, p, tables, p + 1)

        ms = {}
        for name, step in steps.items():
            for _ in range(3):
                step(batch(40))
            n = max(10, args.steps // b)
            t = time.perf_counter()
            for i in range(n):
                step(batch(40 + i % 20))
            ms[name] = (time.perf_counter() - t) / n * 1e3
        print(f"batch {b}: scripted {ms['scripted']:.2f} ms, native {ms['native']:.2f} ms "
              f"({ms['scripted'] / ms['native']:.2f}x)")


if __name__ == "__main__":
    main()
