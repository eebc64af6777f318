"""How much of a tensor-parallel decode step is communication: rank 0's time inside collectives against the
whole engine step at TP = N, next to the analysis module's alpha-beta prediction for the same messages.

    python scripts/tp_step_profile.py [--model gemma-3-270m] [--tp 2] [--weights fp32] [--seqs 1] [--prompt-len 32] [--steps 64]

1. Fits this machine's loopback link (gloo between N processes: alpha, beta) from all-reduces of several sizes
   (analysis/collectives.py: measure_allreduce, fit_link).
2. Runs ``--seqs`` greedy requests on ``--model`` at TP = N (engine/parallel/), prefill untimed, then
   times ``--steps`` engine steps; ``layers/parallel.COLLECTIVES`` counts rank 0's seconds, calls and bytes inside
   all-reduces (2 per layer + the embedding's) and the logits' all-gather, waits for the slower rank included.
3. Predicts the same step's communication: per layer 2 all-reduces of [seqs, hidden] activations (+1 for the
   vocabulary-parallel embedding) and one all-gather of each rank's logits (analysis/parallel.py: allreduce_time,
   gather_time), at the link fitted from isolated all-reduces and at the link whose alpha is calibrated on a
   back-to-back train of a step's all-reduces (``AllReduceMeasurement.train_link``, best and median).
4. Runs the same requests at TP = 1 (the module step TP runs, and the fastest step) for the time without
   communication.

Prints JSON (medians and best of the timed steps); docs/RESULTS.md records it (issue 22).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from loom import LLM
from loom.analysis.collectives import measure_allreduce
from loom.analysis.parallel import allreduce_time, gather_time
from loom.layers import parallel
from loom.sampling_params import SamplingParams


def timed_steps(llm: LLM, seqs: int, prompt_len: int, steps: int) -> tuple[list[float], list[tuple[float, int, int]]]:
    """Seconds of each timed engine step and rank 0's collective (seconds, calls, bytes) in it."""
    eng = llm.engine
    assert eng is not None
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(seqs):
        eng.add_request(f"r{i}", [rng.randrange(100, 40000) for _ in range(prompt_len)], params)
    while any(s.num_computed < s.prompt_len for s in eng.live_sequences()):  # the prefill, untimed
        eng.step()
    eng.step()
    times, comms = [], []
    for _ in range(steps):
        before = parallel.COLLECTIVES.snapshot()
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
        after = parallel.COLLECTIVES
        comms.append((after.seconds - before.seconds, after.calls - before.calls, after.bytes - before.bytes))
    return times, comms


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1e3, "best_ms": min(xs) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m", help="4 heads: SmolLM2-135M's 9 do not split in 2")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--weights", default="fp32")
    ap.add_argument("--seqs", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()

    measured = measure_allreduce(ranks=args.tp)
    link = measured.fit()
    llm = LLM(args.model, weights=args.weights, tensor_parallel_size=args.tp)
    cfg = llm.config
    try:
        times, comms = timed_steps(llm, args.seqs, args.prompt_len, args.steps)
    finally:
        llm.shutdown()
    one_process = {}
    for step in ("module", "auto"):  # the step TP runs, and the fastest, on one process
        times1, _ = timed_steps(LLM(args.model, weights=args.weights, decode_step=step), args.seqs, args.prompt_len,
                                args.steps)
        one_process[step] = summary(times1)

    act = 4 if args.weights != "bf16" else 2
    message = args.seqs * cfg.hidden_size * act
    allreduces = 2 * cfg.num_layers + 1  # o_proj and down_proj per layer, the embedding once
    per_rank_logits = args.seqs * -(-cfg.vocab_size // args.tp) * 4
    def predict(lnk: Any) -> float:
        return allreduces * allreduce_time(message, args.tp, lnk) + gather_time(per_rank_logits, args.tp, lnk)

    predicted = {"isolated_fit": predict(link), "train_best": predict(measured.train_link()),
                 "train_median": predict(measured.train_link(median=True))}
    comm_s = [c[0] for c in comms]
    share = [c / t for c, t in zip(comm_s, times)]
    result: dict[str, Any] = {
        "model": args.model, "tp": args.tp, "weights": args.weights, "seqs": args.seqs, "steps": args.steps,
        "link_fit": {"alpha_us": link.latency * 1e6, "beta_GBps": link.bandwidth / 1e9, "note": link.note},
        "step": summary(times), "step_tp1": one_process,
        "collectives": summary(comm_s) | {"calls_per_step": statistics.median(c[1] for c in comms),
                                          "bytes_per_step": statistics.median(c[2] for c in comms)},
        "share_of_step": {"median": statistics.median(share), "of_best_steps": min(comm_s) / min(times)},
        "predicted_ms": {k: v * 1e3 for k, v in predicted.items()},
        "predicted_over_measured": {"isolated_fit_vs_best": predicted["isolated_fit"] / min(comm_s),
                                    "train_best_vs_best": predicted["train_best"] / min(comm_s),
                                    "train_median_vs_median": predicted["train_median"] / statistics.median(comm_s)},
        "train_alpha_us": {"best": measured.train_link().latency * 1e6,
                           "median": measured.train_link(median=True).latency * 1e6},
        "step_allreduce_probe": {"allreduces": measured.step_allreduces, "bytes": measured.step_bytes,
                                 "best_ms": measured.step_seconds * 1e3,
                                 "median_ms": measured.step_median_seconds * 1e3},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
