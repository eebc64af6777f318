"""Sentence-embedding throughput (texts/s) of loom and sentence-transformers on the same texts, the same
model (all-MiniLM-L6-v2), the same batch size and the same torch thread count; alternating runs, median of
5 each. Run it on a quiet machine: it refuses to measure while the 1-minute load average is above the
cores it uses plus one (another heavy process would make the numbers noise).

    python scripts/embedding_throughput.py [--threads 2] [--runs 5] [--batch-size 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from loom import LLM
from loom.default_model import default_embedding_model_path

SENTENCES = [
    "The cat sits on the mat.", "Stock markets fell sharply after the central bank raised rates.",
    "A quick brown fox jumps over the lazy dog.", "Machine learning maps sentences to dense vectors.",
    "What is the capital of France?", "Café naïve résumé: accents are stripped by the uncased tokenizer.",
    "Call 555-0199 before 11:59 PM on 12/31/2024.", "Dogs and cats are popular pets in many homes.",
]


def corpus(n: int) -> list[str]:
    """``n`` texts of varied length (one to six sentences), the same every run."""
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(1 + i % 6)) for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--force", action="store_true", help="measure even on a busy machine")
    args = p.parse_args()
    load = os.getloadavg()[0]
    if load > args.threads + 1 and not args.force:
        print(f"the machine is busy (1-minute load {load:.1f} on {os.cpu_count()} cores): not measuring",
              file=sys.stderr)
        return 1
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    path = default_embedding_model_path()
    texts = corpus(args.texts)
    loom_model = LLM(path, num_threads=args.threads)
    st_model = SentenceTransformer(path, device="cpu")
    runners = {"loom": lambda: loom_model.embed(texts, batch_size=args.batch_size),
               "sentence-transformers": lambda: st_model.encode(texts, batch_size=args.batch_size,
                                                                convert_to_tensor=True)}
    for run in runners.values():  # warm-up: first-call allocations, oneDNN / MKL kernel selection
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.runs):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)
    tokens = sum(len(ids) for ids in loom_model.embedder.tokenize(texts))
    result = {"model": "all-MiniLM-L6-v2", "texts": len(texts), "tokens": tokens, "batch_size": args.batch_size,
              "threads": args.threads, "runs": args.runs, "load_average_before": load,
              "texts_per_s": {name: len(texts) / statistics.median(s) for name, s in seconds.items()},
              "seconds": seconds}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, rate in result["texts_per_s"].items():
            print(f"{name:>22}: {rate:8.1f} texts/s (median of {args.runs}; {len(texts)} texts, {tokens} tokens, "
                  f"batch {args.batch_size}, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
