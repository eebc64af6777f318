"""Where an engine step's time goes at N running sequences: the model against the host's own work.

    python scripts/engine_step_profile.py [--weights bf16] [--seqs 64] [--prompt-len 128] [--steps 64]

Starts N greedy requests (random prompt ids, ignore_eos), runs their prefill, then times ``--steps`` decode
steps of the engine with every phase measured around the engine's own methods:

    schedule     the scheduler's choice of sequences and blocks
    inputs       the runner's input building (token ids, positions, slots, block tables) and output slicing
    model        the decode step (all layers, the output layer)
    sampling     the batched sampler (one argmax for greedy rows)
    outputs      per-sequence appends, detokenization, stop checks and output deltas

and prints milliseconds per step and each phase's share as JSON (docs/RESULTS.md, issue 16 item 2).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from typing import Any, Callable

from loom import LLM
from loom.engine import engine as engine_module
from loom.sampling_params import SamplingParams


def timed(store: dict[str, list[float]], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        store[key].append(time.perf_counter() - t)
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="bf16")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(weights=args.weights)
    eng = llm.engine
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.steps + 256, temperature=0.0, ignore_eos=True)  # none finishes while timed
    for i in range(args.seqs):
        eng.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(args.prompt_len)], params)
    while any(s.num_computed < s.prompt_len for s in eng.live_sequences()):  # the prefill, untimed
        eng.step()
    eng.step()
    t: dict[str, list[float]] = defaultdict(list)
    eng.scheduler.schedule = timed(t, "schedule", eng.scheduler.schedule)
    eng.runner.execute = timed(t, "execute", eng.runner.execute)
    eng.runner.decode = timed(t, "model", eng.runner.decode)
    eng._sample = timed(t, "sample_all", eng._sample)
    sample = engine_module.sample
    engine_module.sample = timed(t, "sampling", sample)
    try:
        for _ in range(args.steps):
            timed(t, "step", eng.step)()
    finally:
        engine_module.sample = sample
    ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
    phases = {"schedule": ms["schedule"], "inputs": ms["execute"] - ms["model"], "model": ms["model"],
              "sampling": ms["sampling"], "outputs": ms["sample_all"] - ms["sampling"]}
    phases["other"] = ms["step"] - sum(phases.values())
    running = len(eng.live_sequences())
    print(json.dumps({"weights": args.weights, "running_sequences": running, "decode_steps": eng.runner.describe_steps(),
                      "step_ms_median": ms["step"], "phases_ms_median": phases,
                      "share": {k: v / ms["step"] for k, v in phases.items()},
                      "host_share": 1 - phases["model"] / ms["step"]}, indent=1))


if __name__ == "__main__":
    main()
