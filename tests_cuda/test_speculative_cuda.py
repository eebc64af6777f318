"""Speculative decoding on CUDA: greedy output equals plain decoding's for every method, seeded sampling
repeats, and both caches give every block back."""

from __future__ import annotations

import pytest

from loom.config import CacheConfig, EngineConfig, SpeculativeConfig
from loom.engine.engine import LLMEngine
from loom.sampling_params import SamplingParams

PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] * 2 for i in range(8)]


def _run(llm, spec, params):
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(cache=CacheConfig(memory_bytes=1 << 30), speculative=spec))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    outs = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs[d.request_id] += d.token_ids
        engine.block_manager.check_invariants(engine.live_sequences())
    assert engine.block_manager.num_used_blocks == 0
    return [outs[str(i)] for i in range(len(PROMPTS))], engine


@pytest.mark.parametrize("method", ["ngram", "window", "draft"])
def test_speculative_greedy_equals_plain_on_cuda(llm32, method):
    spec = {"ngram": SpeculativeConfig("ngram", 3), "window": SpeculativeConfig("window", 3, window=16),
            "draft": SpeculativeConfig("draft", 3, draft_model=llm32.model)}[method]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, _ = _run(llm32, None, params)
    outs, engine = _run(llm32, spec, params)
    assert outs == plain
    stats = engine.stats().speculative
    assert stats.passes > 0
    if method == "draft":  # the draft is the target itself
        assert stats.acceptance_rate == 1.0 and engine.speculator.drafter.num_used_blocks == 0


def test_speculative_seeded_sampling_repeats_on_cuda(llm32):
    spec = SpeculativeConfig("draft", 3, draft_model=llm32.model)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    first, _ = _run(llm32, spec, params)
    second, _ = _run(llm32, spec, params)
    assert first == second
