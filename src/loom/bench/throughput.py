"""`loom bench throughput`: many requests at once through the engine, against HF static batching.

Workload (vLLM's "random" dataset): ``num_prompts`` prompts of ``input_len`` random token ids, each
generating exactly ``output_len`` tokens, all submitted at time zero. Random ids keep the prefix
cache from hitting, so nothing is skipped.

loom runs continuous batching over its paged cache. The peer is what HF transformers users do for
offline batches: static batches of ``hf_batch`` prompts (left-padded) through ``generate``. With
``repeats`` > 1 the two alternate and the best of each is kept.
KV waste is read every step: allocated slots (used blocks x block size) minus slots holding a
token's K/V, over allocated slots (vLLM reports < 4%: only the last block of each sequence is
partly filled).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import torch

from loom.config import EngineConfig
from loom.device import synchronize
from loom.llm import LLM
from loom.sampling_params import SamplingParams


def random_prompts(num: int, length: int, vocab: int, seed: int = 0, avoid: tuple[int, ...] = ()) -> list[list[int]]:
    rng = random.Random(seed)
    banned = set(avoid)
    pool = [t for t in range(vocab) if t not in banned]
    return [[rng.choice(pool) for _ in range(length)] for _ in range(num)]


def run_loom(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    engine = llm.engine
    engine.block_manager.reset_prefix_cache()  # a repeat must not find the last run's prompts cached
    params = SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len)
    bm, bs = engine.block_manager, engine.kv_cache.block_size
    base_used = bm.num_used_blocks
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params)
    generated, peak, waste_sum, waste_steps, steps = 0, 0, 0.0, 0, 0
    while engine.has_unfinished_requests():
        for d in engine.step():
            generated += len(d.token_ids)
        steps += 1
        live = engine.live_sequences()
        used = bm.num_used_blocks - base_used
        peak = max(peak, used)
        if used:
            filled = sum(s.num_computed for s in live)
            waste_sum += (used * bs - filled) / (used * bs)
            waste_steps += 1
    elapsed = time.perf_counter() - t0
    total = sum(len(p) for p in prompts) + generated
    return {"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": generated / elapsed,
            "total_tokens_per_s": total / elapsed, "output_tokens": generated, "steps": steps,
            "peak_kv_blocks": peak, "kv_blocks_total": bm.num_blocks, "block_size": bs,
            "kv_waste_mean": waste_sum / max(waste_steps, 1),
            "preemptions": engine.scheduler.num_preemptions}


class HFStatic:
    """HF transformers ``generate`` over static batches of ``batch`` prompts (left-padded)."""

    def __init__(self, folder: str, dtype: torch.dtype, pad_id: int, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(device)
        self.pad_id = pad_id
        self.device = torch.device(device)

    def run(self, prompts: list[list[int]], output_len: int, batch: int) -> dict[str, Any]:
        generated = 0
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(prompts), batch):
                chunk = prompts[i:i + batch]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
                out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=output_len, min_new_tokens=output_len,
                                          pad_token_id=self.pad_id)
                generated += (out.shape[1] - width) * len(chunk)
        synchronize(self.device)
        elapsed = time.perf_counter() - t0
        total = sum(len(p) for p in prompts) + generated
        return {"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
                "output_tokens_per_s": generated / elapsed, "total_tokens_per_s": total / elapsed,
                "output_tokens": generated, "batch": batch}


def run_throughput(engine: EngineConfig | None = None, *, num_prompts: int = 64, input_len: int = 128,
                   output_len: int = 128, peers: tuple[str, ...] = ("hf",), hf_batch: int = 8, seed: int = 0,
                   repeats: int = 1, warmup: bool | None = None) -> dict[str, Any]:
    """loom (built from ``engine``: model, weights, device, cache, scheduler, KV policy, RoPE scaling, decode
    step) against HF static batching on the same prompts. ``warmup``: one untimed run of each engine first
    (default: on CUDA only, where it captures loom's decode graphs and loads the GPU libraries of both).
    A KV policy bounds loom's requests' memory (eviction), the peers keep their full caches; a RoPE
    override changes loom's model only (the HF peer runs the file as it is)."""
    engine = engine or EngineConfig()
    if min(num_prompts, input_len, output_len, repeats) < 1:
        raise ValueError("--num-prompts, --input-len, --output-len and --repeats must be at least 1")
    unknown = set(peers) - {"hf"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)} (available: hf)")
    llm = LLM(config=engine)
    dtype = str(llm.model.dtype).replace("torch.", "")  # HF runs dense in loom's dense dtype
    special = tuple(llm.tokenizer.eos_token_ids) + ((llm.tokenizer.bos_token_id,) if llm.tokenizer.bos_token_id
                                                     is not None else ())
    prompts = random_prompts(num_prompts, input_len, llm.config.vocab_size, seed, avoid=special)
    hf = None
    if "hf" in peers:
        from loom.bench.peers import hf_reference_copy

        folder = llm.model_path if os.path.isdir(llm.model_path) else hf_reference_copy(llm.model_path)
        pad = llm.tokenizer.eos_token_ids[0] if llm.tokenizer.eos_token_ids else 0
        hf_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        hf = HFStatic(folder, hf_dtype, pad, llm.device)
    if warmup if warmup is not None else llm.device.type == "cuda":
        run_loom(llm, prompts, output_len)
        if hf is not None:
            hf.run(prompts[:hf_batch], output_len, hf_batch)
    loom_runs, hf_runs = [], []
    for _ in range(repeats):  # alternate, so a drifting machine slows both alike
        loom_runs.append(run_loom(llm, prompts, output_len))
        if hf is not None:
            hf_runs.append(hf.run(prompts, output_len, hf_batch))
    best = lambda runs: max(runs, key=lambda r: r["total_tokens_per_s"])  # noqa: E731
    results: dict[str, Any] = {"loom": {**best(loom_runs),
                                        "total_tokens_per_s_runs": [r["total_tokens_per_s"] for r in loom_runs]}}
    results["loom"]["kv_cache"] = llm.engine.describe()
    results["loom"]["decode_steps"] = llm.engine.runner.describe_steps()
    results["loom"]["max_num_seqs"] = llm.engine.scheduler_config.max_num_seqs
    results["loom"]["max_num_batched_tokens"] = llm.engine.scheduler_config.max_num_batched_tokens
    ratio = None
    if hf_runs:
        results["hf"] = {**best(hf_runs), "total_tokens_per_s_runs": [r["total_tokens_per_s"] for r in hf_runs]}
        ratio = {k: results["loom"][k] / results["hf"][k]
                 for k in ("total_tokens_per_s", "output_tokens_per_s", "requests_per_s")}
    return {"benchmark": "throughput", "model": engine.model or "default", "num_prompts": num_prompts,
            "input_len": input_len, "output_len": output_len, "dtype": dtype, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
            "repeats": repeats,
            "results": results, "loom_over_hf": ratio, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
