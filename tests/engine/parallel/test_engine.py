"""Tensor parallelism through the whole engine, on a tiny random Llama (GQA, 4 heads, 2 KV heads), fp32, gloo:
TP = 2 and TP = 4 (4 processes: KV heads replicated on 2 ranks each) against TP = 1 over 32 prompts x 64 tokens
with continuous batching, preemption (a cache too small for the batch), n > 1, prefix caching and n-gram
speculative decoding; logits within 1e-4; each rank's bytes 1/N of TP = 1's."""

from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from loom.layers.attention import AttentionMetadata
from loom.models.tensor_parallel import rank_memory
from tests.helpers import tiny_llama_folder

PROMPTS = 32
TOKENS = 64


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return tiny_llama_folder(str(tmp_path_factory.mktemp("tp") / "llama"), seed=3)


def options(**more):
    # 128 blocks of 4 tokens: fewer than 32 sequences of ~72 tokens need, so sequences are preempted
    return dict(cache=CacheConfig(block_size=4, num_blocks=128),
                scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=256), **more)


def workload() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[(11 * i + 7 * j) % 250 + 2 for j in range(4 + i % 9)] for i in range(PROMPTS)]
    prompts[5] = prompts[4][:6] + [9, 9]  # shares a prefix with prompt 4 (prefix caching)
    params = [SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True, logprobs=2) for _ in range(PROMPTS)]
    for i in (3, 17):  # two completions each, sampled with a seed: they share the prompt's blocks (copy-on-write)
        params[i] = SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=TOKENS, ignore_eos=True, logprobs=2)
    return prompts, params


def run(llm: LLM):
    prompts, params = workload()
    return llm.generate(prompts, params)


def prefill_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits of every position of one uncached prompt, through the engine's module step (every rank)."""
    step = llm.engine.runner.module
    hidden = step.forward(torch.tensor(ids), AttentionMetadata.uncached([len(ids)]))
    return step.logits(hidden)


def assert_same(ref, out) -> None:
    assert len(ref) == len(out)
    for a, b in zip(ref, out):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            for pa, pb in zip(x.logprobs, y.logprobs):  # the same top-2 tokens, logprobs within 1e-4
                assert pa.keys() == pb.keys()
                assert max(abs(pa[t].logprob - pb[t].logprob) for t in pa) < 1e-4


@pytest.fixture(scope="module")
def reference(tiny_path):
    llm = LLM(tiny_path, **options())
    out = run(llm)
    assert llm.engine.stats().num_preemptions > 0
    probe = list(range(3, 40))
    return out, prefill_logits(llm, probe), rank_memory(llm.model), llm.engine.kv_cache.nbytes, probe


@pytest.mark.parametrize("size", [2, 4])
def test_tp_matches_single_process(tiny_path, reference, size):
    ref, ref_logits, ref_mem, ref_kv, probe = reference
    llm = LLM(tiny_path, tensor_parallel_size=size, **options())
    try:
        assert f"tensor parallel: {size} ranks (gloo)" in llm.engine.describe()
        # decode batches: the scripted step on every rank's shard, all-reduces inside the TorchScript program
        assert llm.engine.runner.describe_steps().startswith(f"scripted (tensor parallel over {size} ranks")
        out = run(llm)
        assert llm.engine.executor.fast_batches > 0
        assert llm.engine.stats().num_preemptions > 0
        assert_same(ref, out)
        torch.testing.assert_close(prefill_logits(llm, probe), ref_logits, atol=1e-4, rtol=0)
        mems = llm.engine.rank_memory()
        assert len(mems) == size
        for mem in mems:
            assert mem["replicated"] == ref_mem["replicated"]  # norms and RoPE tables: every rank's own copy
            assert set(mem["replicated_parts"]) == set(ref_mem["replicated_parts"])
            if size == 2:  # heads, KV heads, MLP units and vocabulary all halve
                assert mem["sharded"] * 2 == ref_mem["sharded"]
                assert mem["kv_cache"] * 2 == ref_kv
            else:  # 2 KV heads over 4 ranks: each rank holds one (replicated on two ranks), the rest quarters
                assert mem["kv_cache"] * 2 == ref_kv
                assert ref_mem["sharded"] / 4 < mem["sharded"] < ref_mem["sharded"] / 2
    finally:
        llm.shutdown()


def test_tp_speculative_decoding_and_embeddings_match_single_process(tiny_path):
    """n-gram drafts verified by the sharded model: the same tokens as the same speculation on one process; and
    the same embeddings."""
    spec = SpeculativeConfig("ngram", num_tokens=3)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [40, 41, 42, 43, 40, 41], list(range(10, 22))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    single = LLM(tiny_path, **options(speculative=spec))
    ref = single.generate(prompts, params)
    llm = LLM(tiny_path, tensor_parallel_size=2, **options(speculative=spec))
    try:
        assert_same(ref, llm.generate(prompts, params))
        assert llm.engine.stats().speculative.draft_tokens > 0
        # embeddings (pooled final states) through the same commands
        torch.testing.assert_close(llm.embed(prompts), single.embed(prompts), atol=1e-5, rtol=0)
    finally:
        llm.shutdown()


def test_a_hung_worker_fails_the_engine_within_the_timeout(tiny_path):
    """A worker stopped (SIGSTOP) while the engine idles: the heartbeat's all-reduce times out, the engine
    reports the problem and every later step raises WorkerLostError at once: nothing waits forever."""
    import os
    import signal
    import time

    from loom.config import ParallelConfig
    from loom.errors import WorkerLostError

    llm = LLM(tiny_path, parallel=ParallelConfig(tensor_parallel_size=2, timeout_s=2.0, heartbeat_s=0.5),
              cache=CacheConfig(num_blocks=32))
    worker = llm.engine.world.processes[0]
    try:
        assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
        assert llm.engine.health_problem() is None
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        while llm.engine.health_problem() is None and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert time.monotonic() - start < 2.0 + 0.5 + 2  # the timeout, a heartbeat, slack for this busy machine
        assert "2 s collective timeout" in llm.engine.health_problem()
        with pytest.raises(WorkerLostError, match="tensor parallelism failed during 'ping'"):
            llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4))
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        llm.shutdown()
