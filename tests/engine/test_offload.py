"""Generating under a memory budget (engine/offload.py): the same tokens and logits as with every weight in memory,
batched and alone, with and without speculative decoding; the plan reported; a budget too small refused."""

from __future__ import annotations

import pytest

from loom import LLM, SamplingParams
from loom.config import CacheConfig, SpeculativeConfig
from loom.engine.budget import BudgetError
from tests.helpers import byte_level_vocab_meta, save_tiny_hf, write_llama_gguf

LAYERS = 6
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [9, 8, 7], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
CACHE = CacheConfig(num_blocks=48)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    hf = save_tiny_hf(str(root / "hf"), "llama", num_key_value_heads=2, num_hidden_layers=LAYERS)
    target = str(root / "target-Q4_0.gguf")
    write_llama_gguf(target, hf, "Q4_0", tokenizer_meta=byte_level_vocab_meta())
    draft_hf = save_tiny_hf(str(root / "draft-hf"), "llama", seed=1, num_key_value_heads=2)
    draft = str(root / "draft.gguf")
    write_llama_gguf(draft, draft_hf, "F32", tokenizer_meta=byte_level_vocab_meta())
    return target, draft


@pytest.fixture(scope="module")
def reference(models):
    """In memory, through the module step (the path a budget takes): outputs batched and alone."""
    llm = LLM(models[0], cache=CACHE, decode_step="module")
    return llm.generate(PROMPTS, PARAMS), [llm.generate([p], PARAMS)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def minimum(models):
    llm = LLM(models[0], cache=CACHE, memory_budget=10**9)
    assert not llm.offload.plan.streaming and "6 of 6 decoder layers" in llm.engine.describe()
    return llm.offload.plan


def _same(outputs, want) -> None:
    for got, ref in zip(outputs, want):
        assert got.token_ids == ref.token_ids
        assert len(got.outputs[0].logprobs) == len(ref.outputs[0].logprobs) == PARAMS.max_tokens
        for a, b in zip(got.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) <= 1e-5 for t in a)


@pytest.mark.parametrize("share", [0.0, 0.5])  # every layer streamed; about half of them resident
def test_generation_under_a_budget_equals_in_memory(models, reference, minimum, share):
    budget = int(minimum.minimum_bytes + share * (minimum.planned_bytes - minimum.minimum_bytes))
    llm = LLM(models[0], cache=CACHE, memory_budget=budget)
    try:
        plan = llm.offload.plan
        assert plan.streaming and plan.planned_bytes <= budget
        assert (len(plan.resident_layers) > 0) == (share > 0)
        text = llm.engine.describe()
        assert "decode steps: module" in text and "streamed: layers" in text and "reads: " in text
        batched, alone = reference
        _same(llm.generate(PROMPTS, PARAMS), batched)
        _same([llm.generate([p], PARAMS)[0] for p in PROMPTS], alone)
        stats = llm.offload.stats()
        assert stats["layers_read"] >= len(plan.streamed_layers) and stats["bytes_read"] > 0
    finally:
        llm.close()


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_under_a_budget_equals_plain_decoding_in_memory(models, reference, minimum, method):
    """The streamed target verifies k + 1 tokens per pass over its weights; a draft model stays resident and
    counts against the budget."""
    spec = SpeculativeConfig(method, num_tokens=3, draft_model=models[1] if method == "draft" else None)
    whole = LLM(models[0], cache=CACHE, memory_budget=10**9, speculative=spec).offload.plan
    llm = LLM(models[0], cache=CACHE, memory_budget=whole.minimum_bytes, speculative=spec)
    try:
        plan = llm.offload.plan
        assert plan.streaming and (plan.draft_bytes > 0) == (method == "draft")
        batched, alone = reference
        _same(llm.generate(PROMPTS, PARAMS), batched)
        _same([llm.generate([p], PARAMS)[0] for p in PROMPTS[:1]], alone[:1])
        assert llm.engine.speculator.stats.passes > 0
    finally:
        llm.close()


def test_a_budget_below_the_minimum_is_refused_with_the_minimum(models, minimum):
    with pytest.raises(BudgetError, match="smallest workable set") as e:
        LLM(models[0], cache=CACHE, memory_budget=minimum.minimum_bytes - 1)
    assert f"--memory-budget {minimum.minimum_bytes}" in str(e.value)
    llm = LLM(models[0], cache=CACHE, memory_budget=minimum.minimum_bytes)  # the minimum itself works
    assert llm.offload.plan.resident_layers == [] and llm.generate([PROMPTS[0]], PARAMS)[0].token_ids
    llm.close()


def test_sizes_and_decode_steps_a_budget_takes():
    with pytest.raises(ValueError, match="module step"):
        LLM("unused.gguf", memory_budget="300M", decode_step="native")
    from loom.config import EngineConfig

    assert EngineConfig(memory_budget="1.5G").memory_budget == int(1.5 * 2**30)
    assert EngineConfig(memory_budget="300MB").memory_budget == 300 * 10**6
    with pytest.raises(ValueError, match="at least 2"):
        EngineConfig(memory_budget=10**9, stream_buffers=1)
