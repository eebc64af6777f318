"""Time one decode step of the default model, native (C++) vs scripted (TorchScript), at several batch sizes.

    python scripts/decode_step_timing.py [--weights native|fp32] [--batches 1,2,4,8,16,32] [--steps 100]

Calls ``DecodeGraph`` directly (no scheduler or sampler), each sequence at a context of 40-60 tokens,
and prints milliseconds per step for each path and the ratio (docs/RESULTS.md, "Batch-1 decode with
the native decode step").
"""

from __future__ import annotations

import argparse
import time

import torch

from loom import LLM
from loom.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="native")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    llm = LLM(weights=args.weights)
    graph = llm.engine.runner.graph
    graph.native_max_batch = max(graph.native_max_batch, 64)  # time the native step at every size asked for
    llm.generate([list(range(100, 132))], SamplingParams(max_tokens=1, temperature=0.0))  # builds, warms up
    for b in (int(x) for x in args.batches.split(",")):
        tables = torch.tensor([[0, 1, 2, 3]] * b)  # every row reads the same 4 blocks: a context of up to 64

        def step(pos: int) -> torch.Tensor:
            p = torch.tensor([pos] * b)
            return graph(torch.tensor([5] * b), p, p, tables, p + 1)

        ms = {}
        for native in (False, True):
            graph.use_native = native
            for _ in range(3):
                step(40)
            n = max(10, args.steps // b)
            t = time.perf_counter()
            for i in range(n):
                step(40 + i % 20)
            ms[native] = (time.perf_counter() - t) / n * 1e3
        graph.use_native = True
        print(f"batch {b}: scripted {ms[False]:.2f} ms, native {ms[True]:.2f} ms ({ms[False] / ms[True]:.2f}x)")


if __name__ == "__main__":
    main()
