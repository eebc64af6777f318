"""`loom bench latency`: batch-1 prefill and decode speed of loom and its peers, from one run.

Every figure is read against the machine's limit: decode moves (weights + KV) bytes per token, so
tokens/s can be at most measured bandwidth / bytes per token.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Sequence

import torch

from loom.analysis.hardware import measure_memory_bandwidth
from loom.analysis.traffic import decode_bytes_per_token
from loom.bench.text import benchmark_prompt_ids
from loom.llm import LLM
from loom.outputs import Timings
from loom.sampling_params import SamplingParams


def _loom_latency(llm: LLM, prompt_ids: list[int], gen_len: int, repeats: int) -> Timings:
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    for _ in llm.stream(prompt_ids[:8], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)):
        pass  # warm-up
    best: Timings | None = None
    for _ in range(repeats):
        t = Timings()
        for _ in llm.stream(prompt_ids, params, t):
            pass
        if best is None or t.decode_tokens_per_s > best.decode_tokens_per_s:
            best = t
    return best


def _limit(bytes_per_token: float, bandwidth: float, rate: float) -> dict[str, float]:
    roof = bandwidth / bytes_per_token
    return {"bytes_per_token": bytes_per_token, "bandwidth_limit_tokens_per_s": roof,
            "fraction_of_limit": rate / roof}


def run_latency(model: str | None = None, *, batch: int = 1, prompt_len: int = 32, gen_len: int = 128,
                peers: Sequence[str] = ("hf",), dtype: str = "float32", repeats: int = 3) -> dict[str, Any]:
    if batch != 1:
        raise ValueError("bench latency measures batch 1 (batched throughput: `loom bench throughput`)")
    if gen_len < 2:
        raise ValueError("--gen-len must be at least 2 to measure decoding")
    unknown = set(peers) - {"hf"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)} (available: hf)")
    llm = LLM(model, dtype=dtype)
    prompt_ids = benchmark_prompt_ids(llm.tokenizer, prompt_len)
    bandwidth = measure_memory_bandwidth()
    context = prompt_len + gen_len / 2  # mean context over the decode
    t = _loom_latency(llm, prompt_ids, gen_len, repeats)
    bytes_tok = decode_bytes_per_token(llm.model, context)
    results: dict[str, Any] = {
        "loom": {"dtype": dtype, "load_s": llm.load_seconds, "prefill_s": t.prefill,
                 "prefill_tokens_per_s": t.prefill_tokens_per_s, "decode_tokens_per_s": t.decode_tokens_per_s,
                 **_limit(bytes_tok, bandwidth, t.decode_tokens_per_s)},
    }
    if "hf" in peers:
        from loom.bench.peers import hf_latency, hf_reference_copy

        folder = llm.model_path if os.path.isdir(llm.model_path) else hf_reference_copy(llm.model_path)
        del llm  # free loom's copy of the weights before HF loads its own
        hf = hf_latency(folder, prompt_ids, gen_len, torch.float32 if dtype in ("float32", "fp32") else torch.bfloat16,
                        repeats)
        results["hf"] = {"dtype": hf.dtype, "prefill_s": hf.prefill_s,
                         "prefill_tokens_per_s": prompt_len / hf.prefill_s,
                         "decode_tokens_per_s": hf.decode_tokens_per_s,
                         **_limit(bytes_tok, bandwidth, hf.decode_tokens_per_s)}
        speedup = {
            "decode": results["loom"]["decode_tokens_per_s"] / hf.decode_tokens_per_s,
            "prefill": hf.prefill_s / results["loom"]["prefill_s"],
        }
    else:
        speedup = None
    return {
        "benchmark": "latency", "model": model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "repeats": repeats,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "memory_bandwidth_GBps": bandwidth / 1e9,
        "results": results, "speedup_vs_hf": speedup, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
