"""Property test: any interleaving of add / abort / step keeps the block accounting exact, and when
everything has ended no block is held except by the prefix cache (and those are reclaimable). Some
requests run under a KV eviction policy (bounded memory), mixed with plain ones."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.config import CacheConfig, EngineConfig, KVPolicyConfig, ModelConfig, SchedulerConfig
from loom.engine.engine import LLMEngine
from loom.models.transformer import Transformer
from loom.sampling_params import SamplingParams
from loom.tokenizer import tokenizer_from_gguf_metadata
from tests.helpers import byte_level_metadata

MODEL = Transformer(ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                                max_position_embeddings=256)).init_random(1, std=0.2).requires_grad_(False)
TOKENIZER = tokenizer_from_gguf_metadata(byte_level_metadata())
BASE = list(range(40, 120))

op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(0, 40), st.integers(1, 12), st.integers(1, 3),
              st.booleans(), st.sampled_from([None, "window", "streaming", "h2o"])),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), num_blocks=st.integers(12, 60), block_size=st.sampled_from([2, 4, 8]),
       budget=st.sampled_from([4, 16, 512]), chunked=st.booleans(), prefix=st.booleans(),
       max_seqs=st.sampled_from([2, 8, 64]))
def test_random_interleavings_keep_accounting_exact(ops, num_blocks, block_size, budget, chunked, prefix, max_seqs):
    engine = LLMEngine(MODEL, TOKENIZER, EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                  enable_chunked_prefill=chunked)))
    bm = engine.block_manager
    added = 0

    def check():
        bm.check_invariants(engine.live_sequences())

    for item in ops:
        if item[0] == "add":
            _, shared, tail, max_tokens, n, sample, policy = item
            prompt = BASE[:shared] + [200 + (added * 7 + i) % 50 for i in range(tail)]
            kv_policy = None if policy is None else KVPolicyConfig(policy, budget=5, sink_tokens=1, prefill_chunk=3)
            params = SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0 if sample else 0.0, seed=added,
                                    ignore_eos=True, kv_policy=kv_policy)
            try:
                engine.add_request(str(added), prompt, params)
            except ValueError:
                pass  # too long for this cache: refused, nothing changed
            added += 1
        elif item[0] == "abort":
            engine.abort_request(str(item[1]))
        else:
            for _ in range(item[1]):
                engine.step()
                check()
        check()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        check()
        steps += 1
        assert steps < 5000, "the engine stopped making progress"
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_used_blocks == 0  # every block is free or merely cached
    bm.reset_prefix_cache()
    assert bm.num_free_blocks == bm.num_blocks and bm.num_cached_blocks == 0
