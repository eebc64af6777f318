"""Sentence-embedding throughput (texts/s) of loom and sentence-transformers on the same texts, the same
model (all-MiniLM-L6-v2), the same batch size and the same torch thread count; alternating runs, median of
5 each, for each dtype asked (``--dtypes fp32,bf16``: both sides in each, so each is read at its best), with
each configuration's largest cosine distance from sentence-transformers' fp32 vectors. Run it on a quiet
machine: it refuses to measure while the 1-minute load average is above the cores it uses plus one
(another heavy process would make the numbers noise).

    python scripts/embedding_throughput.py [--threads 2] [--runs 5] [--batch-size 32] [--dtypes fp32,bf16] [--json]
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
    p.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16 (each side runs each)")
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
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    runners = {}
    loom_fp32 = None
    for d in dtypes:
        loom_model = LLM(path, num_threads=args.threads, weights=d)
        st_model = SentenceTransformer(path, device="cpu", model_kwargs={"torch_dtype": torch_dtype[d]})
        loom_fp32 = loom_fp32 or loom_model
        runners[f"loom {d}"] = lambda m=loom_model: m.embed(texts, batch_size=args.batch_size)
        runners[f"sentence-transformers {d}"] = lambda m=st_model: m.encode(texts, batch_size=args.batch_size,
                                                                          convert_to_tensor=True)
    reference = SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True).float()
    distance = {}
    for name, run in runners.items():  # warm-up (first-call allocations, oneDNN / MKL kernel selection) + check
        vectors = run().float()
        distance[name] = float((1 - torch.nn.functional.cosine_similarity(vectors, reference)).max())
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.runs):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t0)
    tokens = sum(len(ids) for ids in loom_fp32.embedder.tokenize(texts))
    rates = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    best = {side: max((r, n) for n, r in rates.items() if n.startswith(side)) for side in ("loom", "sentence")}
    result = {"model": "all-MiniLM-L6-v2", "texts": len(texts), "tokens": tokens, "batch_size": args.batch_size,
              "threads": args.threads, "runs": args.runs, "load_average_before": load,
              "texts_per_s": rates, "seconds": seconds,
              "max_cosine_distance_from_st_fp32": distance,
              "best": {"loom": best["loom"][1], "sentence-transformers": best["sentence"][1],
                       "ratio": best["loom"][0] / best["sentence"][0]}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, rate in result["texts_per_s"].items():
            print(f"{name:>27}: {rate:8.1f} texts/s (median of {args.runs}; {len(texts)} texts, {tokens} tokens, "
                  f"batch {args.batch_size}, {args.threads} threads; cosine distance from ST fp32 "
                  f"{distance[name]:.1e})")
        print(f"best against best: {result['best']['ratio']:.2f}x ({result['best']['loom']} / "
              f"{result['best']['sentence-transformers']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
