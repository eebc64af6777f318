"""`loom bench latency --speculative METHODS`: batch-1 decoding with speculation against plain
decoding, from one run, on a copy-heavy prompt, an open-ended one, and a long-context one (a scene of
Hamlet, ~3,000 tokens, to summarize: where reading the KV cache is a large part of each step).

Every engine shares the one loaded target model (each has its own KV cache); runs alternate
between plain decoding and each method, keeping each one's best decode speed. Each generation is
exactly ``gen_len`` tokens (EOS banned until then, as the plain latency bench does), greedy unless
``temperature`` is set; greedy outputs are compared token for token with plain decoding's.

Reported per prompt and method: decode tokens/s and the speedup over plain decoding; the
acceptance rate a (accepted / drafts evaluated); tokens per target pass, measured and as the formula
(1 - a^(k+1)) / (1 - a) predicts; and the time spent drafting.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Sequence

import torch

from loom.bench.text import PASSAGE
from loom.config import CacheConfig, EngineConfig, SpeculativeConfig
from loom.engine.engine import LLMEngine
from loom.engine.speculative import SpeculativeStats
from loom.llm import LLM
from loom.sampling_params import SamplingParams

PROMPTS = {
    "copy": "Rewrite the following passage, keeping its wording wherever you can:\n\n" + PASSAGE,
    "open": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "long": "{hamlet}\n\nSummarize what happens in the text above.",
}
LONG_CHARS = 11_000  # of the calibration corpus (Hamlet): ~3,000 tokens


def prompt_text(name: str) -> str:
    text = PROMPTS[name]
    if "{hamlet}" in text:
        from loom.eval.corpora import CALIBRATION_CORPUS, read_corpus

        text = text.replace("{hamlet}", read_corpus(CALIBRATION_CORPUS)[:LONG_CHARS])
    return text
METHODS = ("ngram", "draft", "window")


def _decode(engine: LLMEngine, ids: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """Generate one completion; returns its tokens and its decode speed (tokens after the first / time)."""
    engine.block_manager.reset_prefix_cache()
    engine.add_request("bench", ids, params)
    tokens: list[int] = []
    first = last = 0.0
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.token_ids and not tokens:
                first = time.perf_counter()
            tokens += d.token_ids
            last = time.perf_counter()
    return tokens, (len(tokens) - 1) / (last - first)


def speculative_config(method: str, k: int, model_path: str, draft_model: str | None, draft_weights: str | None,
                       window: int, sink_tokens: int) -> SpeculativeConfig:
    if method == "draft":  # default draft: the target's own file with its native (quantized) weights
        return SpeculativeConfig("draft", k, draft_model=draft_model or model_path,
                                 draft_weights=draft_weights or "native")
    return SpeculativeConfig(method, k, window=window, sink_tokens=sink_tokens)


def run_speculative_latency(model: str | None = None, *, methods: Sequence[str] = METHODS, num_tokens: int = 3,
                            draft_model: str | None = None, draft_weights: str | None = None,
                            weights: str | None = None, dtype: str | None = None, gen_len: int = 128,
                            repeats: int = 3, temperature: float = 0.0, window: int = 64, sink_tokens: int = 4,
                            prompts: Sequence[str] = tuple(PROMPTS), rope_scaling: Any = None) -> dict[str, Any]:
    if set(prompts) - set(PROMPTS):
        raise ValueError(f"unknown prompts {sorted(set(prompts) - set(PROMPTS))} (available: {', '.join(PROMPTS)})")
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"--speculative takes one or more of {', '.join(METHODS)} (got {', '.join(methods)})")
    if gen_len < 2 or repeats < 1:
        raise ValueError("--gen-len must be at least 2 and --repeats at least 1")
    llm = LLM(model, weights=weights, dtype=dtype, rope_scaling=rope_scaling)
    cache = CacheConfig(memory_bytes=512 << 20)
    engines = {"plain": LLMEngine(llm.model, llm.tokenizer, EngineConfig(cache=cache))}
    configs = {m: speculative_config(m, num_tokens, llm.model_path, draft_model, draft_weights, window, sink_tokens)
               for m in methods}
    for m, cfg in configs.items():
        engines[m] = LLMEngine(llm.model, llm.tokenizer, EngineConfig(cache=cache, speculative=cfg))
    params = SamplingParams(temperature=temperature, max_tokens=gen_len, min_tokens=gen_len, seed=0)
    results: dict[str, Any] = {}
    for name in prompts:
        ids = llm.encode_chat([{"role": "user", "content": prompt_text(name)}])
        for engine in engines.values():
            _decode(engine, ids, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
            if engine.speculator is not None:
                engine.speculator.stats = SpeculativeStats()
        speeds: dict[str, list[float]] = {m: [] for m in engines}
        outputs: dict[str, list[int]] = {}
        for _ in range(repeats):
            for m, engine in engines.items():
                tokens, tps = _decode(engine, ids, params)
                speeds[m].append(tps)
                outputs.setdefault(m, tokens)
        plain = max(speeds["plain"])
        row: dict[str, Any] = {"prompt_tokens": len(ids), "plain": {"decode_tokens_per_s": plain,
                                                                     "runs": speeds["plain"]}}
        for m in methods:
            stats = engines[m].speculator.stats  # type: ignore[union-attr]
            best = max(speeds[m])
            row[m] = {"decode_tokens_per_s": best, "runs": speeds[m], "speedup": best / plain,
                      "same_tokens_as_plain": outputs[m] == outputs["plain"], **stats.as_dict()}
        row["plain_text"] = llm.tokenizer.decode(outputs["plain"][:48]) + " ..."
        results[name] = row
    described = {m: {k: v for k, v in vars(c).items() if k in ("method", "num_tokens", "window", "sink_tokens",
                                                                 "draft_weights")}
                 | ({"draft_model": str(c.draft_model)} if m == "draft" else {}) for m, c in configs.items()}
    return {"benchmark": "latency-speculative", "model": llm.model_path, "weights": weights or "native",
            "gen_len": gen_len, "temperature": temperature, "repeats": repeats, "methods": described,
            "decode_steps": engines["plain"].runner.describe_steps(),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
