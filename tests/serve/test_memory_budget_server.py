"""`loom serve` under a memory budget keeps continuous batching: concurrent requests share decode steps, each step
reading the streamed layers once for the whole batch, and every request gets the tokens generated in memory."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from loom import LLM, SamplingParams
from loom.config import CacheConfig
from loom.serve.app import create_app
from tests.helpers import byte_level_vocab_meta, save_tiny_hf, write_llama_gguf
from tests.serve.conftest import serve_app

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [9, 8, 7], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5], [40, 41, 42, 43]]
MAX_TOKENS = 12
CACHE = CacheConfig(num_blocks=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-server")
    hf = save_tiny_hf(str(root / "hf"), "llama", num_key_value_heads=2, num_hidden_layers=6)
    path = str(root / "tiny-Q4_0.gguf")
    write_llama_gguf(path, hf, "Q4_0", tokenizer_meta=byte_level_vocab_meta())
    return path


def test_concurrent_requests_under_a_budget_share_decode_steps(model):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    in_memory = LLM(model, cache=CACHE, decode_step="module")
    # each token's text and logprob, generated alone in memory (the tiny vocabulary's bytes often decode to the same
    # replacement character, so the logprob tells the tokens apart)
    want = []
    for p in PROMPTS:
        out = in_memory.generate([p], params)[0].outputs[0]
        want.append([(in_memory.tokenizer.decode([t]), lp[t].logprob) for t, lp in zip(out.token_ids, out.logprobs)])
    minimum = LLM(model, cache=CACHE, memory_budget=10**9).offload.plan.minimum_bytes
    llm = LLM(model, cache=CACHE, memory_budget=minimum)  # every decoder layer streamed
    plan = llm.offload.plan
    assert plan.streaming and not plan.resident_layers
    live = serve_app(create_app(llm.engine, llm.tokenizer, "tiny", max_request_bytes=1 << 20))
    try:
        read0, steps0 = llm.offload.stats()["layers_read"], llm.engine.stats().steps

        async def complete(client: httpx.AsyncClient, prompt: list[int]) -> list[tuple[str, float]]:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True, "logprobs": 1}
            r = await client.post(live.url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            return list(zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]))

        async def main() -> list[list[tuple[str, float]]]:
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(complete(client, p) for p in PROMPTS))

        got = asyncio.run(main())
        for tokens, ref in zip(got, want):
            assert len(tokens) == len(ref) == MAX_TOKENS
            assert [t for t, _ in tokens] == [t for t, _ in ref]
            assert [lp for _, lp in tokens] == pytest.approx([lp for _, lp in ref], abs=1e-4)
        stats = llm.engine.stats()
        assert stats.multi_sequence_steps >= 1 and stats.max_sequences_per_step > 1
        # one read of every streamed layer per step (plus what the reader prefetched), not one per sequence
        reads, steps = llm.offload.stats()["layers_read"] - read0, stats.steps - steps0
        assert reads <= (steps + plan.buffers) * len(plan.streamed_layers)
    finally:
        live.stop()
        llm.close()
