"""Which projections break a low-rank SmolLM2: each group factorized alone, the others dense.

    python scripts/lowrank_sensitivity.py [--keep 0.9] [--method asvd] [--samples 8] [--max-tokens 4096]

Prints one JSON line per run: the dense model, every decoder linear at full rank (a check: the factors of the
full SVD reproduce the model), then q|k, v|o, gate|up and down factorized alone at --keep. Perplexity on the
first --max-tokens tokens of Britannica (GPTQ protocol, windows of 512); calibration on Hamlet
(docs/RESULTS.md, "Low-rank factorization").
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from loom.bench.quantization import CompressionInputs
from loom.compress.lowrank import LowRankConfig, factorize
from loom.eval.perplexity import perplexity
from loom.weights.loader import load_model

GROUPS = (("q_proj", "k_proj"), ("v_proj", "o_proj"), ("gate_proj", "up_proj"), ("down_proj",))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.9)
    p.add_argument("--method", default="asvd", choices=["svd", "asvd"])
    p.add_argument("--samples", type=int, default=8, help="calibration windows of 512 tokens")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    inputs = CompressionInputs.prepare(None, "britannica", "hamlet", args.samples, 512, "/tmp/lowrank_sensitivity", "x")
    dense = load_model(inputs.path, weights="fp32").model

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, inputs.eval_ids, 512, max_tokens=args.max_tokens, progress=False).perplexity

    print(json.dumps({"name": "dense", "perplexity": ppl(dense)}), flush=True)
    runs = [("every linear at full rank (svd)", LowRankConfig(method="svd", rank=10 ** 6))]
    runs += [(f"{args.method} keep {args.keep:g}: {'+'.join(g)}", LowRankConfig(args.keep, args.method, targets=g))
             for g in GROUPS]
    for name, config in runs:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = factorize(model, config, inputs.calib_samples if config.method == "asvd" else None)
        print(json.dumps({"name": name, "decoder_linear_params_kept": report.fraction_kept, "perplexity": ppl(model),
                          "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
