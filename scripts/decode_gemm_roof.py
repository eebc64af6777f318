"""The decode step's GEMMs against the measured peak of the dtype they run in (issue 16: ">= 60% at 64 rows").

    python scripts/decode_gemm_roof.py [--weights bf16,int8] [--rows 64] [--repeats 20]

Loads the default model with each ``--weights`` path, takes every decoder linear of the engine's decode step in
order (q|k|v, o, gate|up, down per layer, then the output layer) and times one pass over all of them with
``--rows`` rows each, as a decode step calls them: each weight read once, cold, in order; the inputs are what the
path hands its GEMMs (bf16 activations; int8 W8A8 quantizes them per row inside the call). FLOPs are 2 x rows x K x
N per linear; the peak is ``bench.throughput.measure_peaks`` (max of torch.mm and a oneDNN pre-packed weight at
1024^3) in the same run. Prints JSON: per path, the pass's median and best time, GFLOP/s, the fraction of the
dtype's peak, and the decoder linears alone (the output layer aside).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from loom import LLM
from loom.bench.throughput import measure_peaks
from loom.engine.step.weights import DecoderWeights
from loom.layers.quantized import apply_linear


def linears(llm: LLM) -> list[tuple[Any, int, int]]:
    """(spec, K, N) of the decode step's linears, the output layer last."""
    w = DecoderWeights.of(llm.model)
    specs, shapes = [], []
    for layer, module in zip(w.layers, llm.model.layers):
        for spec, m in ((layer.qkv, module.attn.qkv_proj), (layer.o, module.attn.o_proj),
                        (layer.gate_up, module.mlp.gate_up_proj), (layer.down, module.mlp.down_proj)):
            specs.append(spec)
            shapes.append((m.in_features, m.out_features))
    head = llm.model.lm_head
    specs.append(w.head)
    hidden, vocab = llm.config.hidden_size, llm.config.vocab_size
    shapes.append((hidden, vocab) if head is None else (head.in_features, head.out_features))
    return [(s, k, n) for s, (k, n) in zip(specs, shapes)]


def time_pass(items: list[tuple[Any, int, int]], rows: int, dtype: torch.dtype, repeats: int) -> list[float]:
    inputs = {k: torch.randn(rows, k).to(dtype) for _, k, _ in items}
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            for spec, k, _ in items:
                apply_linear(inputs[k], spec)
            times.append(time.perf_counter() - t0)
    return times[2:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="bf16,int8")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    paths = args.weights.split(",")
    roof_dtypes = {"bf16": "bfloat16", "int8": "int8"}  # the dtype each path's GEMMs run in (else float32)
    peaks = measure_peaks([roof_dtypes.get(p, "float32") for p in paths], torch.device("cpu"))
    out: dict[str, Any] = {"rows": args.rows, "peaks": peaks, "paths": {}}
    for path in paths:
        llm = LLM(weights=path)
        items = linears(llm)
        dtype = llm.model.dtype
        roof_dtype = roof_dtypes.get(path, "float32")
        peak = peaks["peak_matmul_flops"][roof_dtype]
        result = {}
        for name, chosen in (("all", items), ("decoder_only", items[:-1])):
            flops = sum(2 * args.rows * k * n for _, k, n in chosen)
            times = time_pass(chosen, args.rows, dtype, args.repeats)
            best, median = min(times), statistics.median(times)
            result[name] = {"linears": len(chosen), "gflop": flops / 1e9, "best_ms": best * 1e3,
                            "median_ms": median * 1e3, "gflops_best": flops / best / 1e9,
                            "gflops_median": flops / median / 1e9, "fraction_of_peak_best": flops / best / peak,
                            "fraction_of_peak_median": flops / median / peak}
        out["paths"][path] = {"roof_dtype": roof_dtype, "peak_flops": peak, **result,
                              "kinds": sorted({spec.kind.name for spec, _, _ in items})}
        del llm
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
