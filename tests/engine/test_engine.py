"""The serving engine: batched outputs equal each request alone (chunked prefill, prefix caching and
preemption on and off), parallel sampling shares blocks, the prefix cache skips work, seeds hold in
busy batches, and logprobs match the model."""

from __future__ import annotations

import random

import pytest
import torch

from loom.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from loom.engine.engine import LLMEngine, QueueFullError
from loom.eval.corpora import kv_calibration_ids
from loom.models.transformer import Transformer
from loom.sampling_params import SamplingParams
from loom.tokenizer import tokenizer_from_gguf_metadata
from tests.engine.reference_decoder import Generator
from tests.helpers import byte_level_metadata

CFG = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
           max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(ModelConfig(**CFG)).init_random(0, std=0.15)
    model.eval().requires_grad_(False)
    return model, tokenizer_from_gguf_metadata(byte_level_metadata())


def make_engine(tiny, num_blocks=200, block_size=4, **sched) -> LLMEngine:
    model, tok = tiny
    prefix = sched.pop("prefix", True)
    return LLMEngine(model, tok, EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(**sched)))


def run_all(engine: LLMEngine, prompts, params, check=False) -> dict[str, dict[int, list[int]]]:
    outs: dict[str, dict[int, list[int]]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
        outs[str(i)] = {}
    peak = 0
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs[d.request_id].setdefault(d.index, []).extend(d.token_ids)
        peak = max(peak, engine.block_manager.num_used_blocks)
        if check:
            engine.block_manager.check_invariants(engine.live_sequences())
    engine.peak_blocks = peak
    return outs


def varied_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def alone(tiny):
    """Reference: each prompt alone through the simple contiguous-cache generator (no engine at all)."""
    model, tok = tiny
    gen = Generator(model, tok)
    prompts = varied_prompts(32)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return prompts, [[t for d in gen.stream(p, params) for t in d.token_ids] for p in prompts]


@pytest.mark.parametrize("setup", [
    dict(),
    dict(enable_chunked_prefill=False),
    dict(prefix=False),
    dict(max_num_batched_tokens=16),  # tiny token budget: many chunks
    dict(num_blocks=30),  # forces preemption
    dict(num_blocks=30, enable_chunked_prefill=False, prefix=False),
    dict(max_num_seqs=3),
    dict(max_num_seqs=32, mkl=True),  # decode steps of 32: dense weights also MKL-packed for 32 rows (opt-in)
    dict(max_num_seqs=48, mkl=True),  # ... packed for 48, batches of 25-32 padded up to it
], ids=["default", "no-chunking", "no-prefix-cache", "small-budget", "preemption", "preemption-plain", "3-seqs",
        "packed", "packed-padded"])
def test_batched_equals_alone(tiny, alone, setup, monkeypatch):
    prompts, want = alone
    setup = dict(setup)
    mkl = setup.pop("mkl", False) and torch.backends.mkl.is_available()
    if mkl:
        monkeypatch.setenv("LOOM_PACK_WEIGHTS", "mkl")
    engine = make_engine(tiny, num_blocks=setup.pop("num_blocks", 400), **setup)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = run_all(engine, prompts, [params] * len(prompts), check=True)
    assert [outs[str(i)][0] for i in range(len(prompts))] == want
    assert engine.block_manager.num_used_blocks == 0
    scripted = engine.runner.step("scripted")
    assert scripted.packed_rows == (setup["max_num_seqs"] if mkl else 0)  # one copy unless asked for two
    if mkl:
        assert f"MKL-packed for decode batches of {scripted.packed_rows}" in engine.describe()


def test_preemption_happens_and_loses_nothing(tiny, alone):
    prompts, want = alone
    engine = make_engine(tiny, num_blocks=30)
    outs = run_all(engine, prompts, [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 32)
    assert engine.scheduler.num_preemptions > 0
    assert [outs[str(i)][0] for i in range(32)] == want


def test_parallel_sampling_shares_the_prompt_blocks(tiny):
    prompt = varied_prompts(1, seed=3)[0] * 3  # 3 x up to 40 tokens
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    shared = make_engine(tiny, prefix=False)
    together = run_all(shared, [prompt], [params], check=True)["0"]
    separate = make_engine(tiny, prefix=False)
    alone = run_all(separate, [prompt] * 4, [SamplingParams(temperature=1.0, seed=5 + i, max_tokens=6,
                                                            ignore_eos=True) for i in range(4)])
    # completion i of an n = 4 request is the seed + i request, token for token (fork + copy-on-write)
    assert [together[i] for i in range(4)] == [alone[str(i)][0] for i in range(4)]
    assert len({tuple(together[i]) for i in range(4)}) > 1
    assert shared.peak_blocks < separate.peak_blocks
    assert shared.prompt_tokens_computed == len(prompt)  # prefilled once, not four times


def test_prefix_cache_skips_a_repeated_system_prompt(tiny):
    system = list(range(10, 70))  # 60 tokens = 15 full blocks of 4
    engine = make_engine(tiny)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = run_all(engine, [system + [100, 101]], [params])["0"][0]
    computed_once = engine.prompt_tokens_computed
    assert computed_once == 62
    second = run_all(engine, [system + [100, 101]], [params])["0"][0]
    assert second == first
    assert engine.prompt_tokens_computed - computed_once == 2  # only the tokens after the cached blocks
    other = run_all(engine, [system + [7, 8, 9]], [params])["0"][0]
    assert engine.prompt_tokens_computed - computed_once == 2 + 3
    assert engine.block_manager.prefix_hit_rate > 0.5
    no_cache = make_engine(tiny, prefix=False)
    assert run_all(no_cache, [system + [7, 8, 9]], [params])["0"][0] == other


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    alone = run_all(make_engine(tiny), [prompt], [params])["0"][0]
    busy = varied_prompts(20, seed=9)
    others = [SamplingParams(temperature=0.8, max_tokens=random.Random(i).randint(1, 20), ignore_eos=True)
              for i in range(20)]
    outs = run_all(make_engine(tiny, num_blocks=60), busy[:10] + [prompt] + busy[10:],
                   others[:10] + [params] + others[10:])
    assert outs["10"][0] == alone


def test_abort_frees_blocks_and_ends_the_stream(tiny):
    engine = make_engine(tiny)
    engine.add_request("a", varied_prompts(1)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", varied_prompts(1, 1)[0], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort_request("a") and not engine.abort_request("nope")
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert any(d.request_id == "a" and d.finish_reason == "abort" for d in seen)
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_bad_requests_change_nothing(tiny):
    engine = make_engine(tiny, num_blocks=20, max_waiting=2)
    assert engine.max_model_len == 80  # capped by the cache: 20 blocks of 4
    with pytest.raises(ValueError, match="exceeds the model's context of 80"):
        engine.add_request("big", [5] * 70, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad", [5, 300], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", [5] * 600, SamplingParams())
    engine.add_request("x", [5], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [5], SamplingParams())
    engine.add_request("y", [6], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        engine.add_request("z", [7], SamplingParams())
    assert set(engine.requests) == {"x", "y"}
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0


def test_logprobs_are_the_models(tiny):
    model, _ = tiny
    engine = make_engine(tiny)
    prompt = [10, 20, 30, 40, 50, 60, 70]
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2,
                                                   ignore_eos=True))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    tokens = [t for d in deltas for t in d.token_ids]
    full = prompt + tokens
    with torch.no_grad():
        lp = torch.log_softmax(model.logits(torch.tensor(full)), -1)
    gen_lps = [e for d in deltas for e in (d.logprobs or [])]
    assert len(gen_lps) == 5
    for k, entry in enumerate(gen_lps):
        pos = len(prompt) - 1 + k
        assert tokens[k] in entry and entry[tokens[k]].rank == 1  # greedy picks the most likely
        assert len(entry) == 3
        for t, e in entry.items():
            assert e.logprob == pytest.approx(float(lp[pos, t]), abs=1e-4) and e.logprob <= 0
    prompt_lps = deltas[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt)
    for i in range(1, len(prompt)):
        e = prompt_lps[i][prompt[i]]
        assert e.logprob == pytest.approx(float(lp[i - 1, prompt[i]]), abs=1e-4)
        assert e.rank == int((lp[i - 1] > lp[i - 1, prompt[i]]).sum()) + 1
        assert len(prompt_lps[i]) <= 3


def test_real_model_32_prompts_together_equal_alone(smollm):
    """SmolLM2: 32 prompts of varied lengths batched, under every scheduler setting, against each one
    alone through the reference generator."""
    from loom.bench.text import PASSAGE

    words = PASSAGE.split()
    rng = random.Random(0)
    prompts = [" ".join(words[rng.randrange(0, 40):][: rng.randint(1, 60)]) for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    gen = Generator(smollm.model, smollm.tokenizer)
    alone = [[t for d in gen.stream(smollm.encode(p), params) for t in d.token_ids] for p in prompts]
    settings = [dict(), dict(enable_chunked_prefill=False, max_num_batched_tokens=256), dict(prefix=False),
                dict(num_blocks=40, max_num_batched_tokens=128)]
    for setup in settings:
        setup = dict(setup)
        engine = LLMEngine(smollm.model, smollm.tokenizer, EngineConfig(
            cache=CacheConfig(block_size=16, num_blocks=setup.pop("num_blocks", 400),
                              enable_prefix_caching=setup.pop("prefix", True)),
            scheduler=SchedulerConfig(**setup)))
        outs = run_all(engine, [smollm.encode(p) for p in prompts], [params] * 32, check=True)
        assert [outs[str(i)][0] for i in range(32)] == alone, setup
        if engine.cache_config.num_blocks == 40:
            assert engine.scheduler.num_preemptions > 0


def test_min_tokens_holds_in_the_engine(tiny):
    engine = make_engine(tiny)
    # A logit bias makes EOS (id 1) the favourite everywhere: without min_tokens it would stop at once.
    engine.add_request("a", [5, 6], SamplingParams(temperature=0, max_tokens=6, min_tokens=6,
                                                   logit_bias={1: 100.0}))
    engine.add_request("b", [5, 6], SamplingParams(temperature=0, max_tokens=6, logit_bias={1: 100.0}))
    engine.add_request("c", [5, 6], SamplingParams(temperature=0, max_tokens=6, min_tokens=3))
    outs = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
    assert len(outs["a"]) == 6 and 1 not in outs["a"]
    assert outs["b"] == [1]
    assert len(outs["c"]) >= 3 and 1 not in outs["c"][:3]


def test_prompt_logprobs_survive_chunking_preemption_and_the_prefix_cache(tiny):
    prompt = list(range(20, 60))
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1, ignore_eos=True)

    def run(engine, warm=False):
        if warm:  # put the prompt's blocks in the prefix cache first
            run_all(engine, [prompt], [SamplingParams(temperature=0, max_tokens=1)])
        deltas, victims = [], []
        preempt = engine.scheduler._preempt
        engine.scheduler._preempt = lambda seq, out: (victims.append(seq.request_id), preempt(seq, out))
        for i, p in enumerate(varied_prompts(6, seed=4)):  # company, to force preemption in small caches
            engine.add_request(f"o{i}", p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        engine.add_request("p", prompt, params)  # the newest: the first to be preempted
        engine.victims = victims
        while engine.has_unfinished_requests():
            deltas += [d for d in engine.step() if d.request_id == "p"]
        lps = deltas[0].prompt_logprobs
        return [t for d in deltas for t in d.token_ids], [None] + [{t: round(e.logprob, 4) for t, e in x.items()}
                                                                   for x in lps[1:]]

    want = run(make_engine(tiny))
    assert len(want[1]) == len(prompt)
    small = make_engine(tiny, num_blocks=28, max_num_batched_tokens=8)
    assert run(small) == want and "p" in small.victims
    assert run(make_engine(tiny), warm=True) == want


def test_int8_kv_cache_serves_batches_without_leaks(tiny):
    """The engine over an int8 cache (small enough to preempt, n > 1): every request completes in full
    and every block comes back. (Closeness to the fp cache is tested at the model level, the scripted step
    against the modules in tests/engine/step.)"""
    model, tok = tiny
    prompts = varied_prompts(12, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=2 if i % 4 == 0 else 1)
              for i in range(len(prompts))]
    outs = {}
    for kind in ("auto", "int8"):
        engine = LLMEngine(model, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=40, kv_dtype=kind)),
                           kv_calibration_ids=kv_calibration_ids(tok))
        assert engine.kv_cache.quantized == (kind == "int8")
        outs[kind] = run_all(engine, prompts, params, check=True)
        if kind == "int8":  # decode batches run the scripted step over the int8 cache, not the modules
            assert engine.runner.last_decode_step == "scripted"
        assert engine.block_manager.num_used_blocks == 0
        assert all(len(toks) == 10 for out in outs[kind].values() for toks in out.values())
        assert sum(len(out) for out in outs[kind].values()) == sum(p.n for p in params)


def test_the_engine_never_changes_its_config(tiny):
    model, tok = tiny
    config = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64),
                          scheduler=SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=16))
    engine = LLMEngine(model, tok, config)
    assert config.scheduler.max_num_batched_tokens == 16  # what the user gave
    assert engine.config.scheduler.max_num_batched_tokens == engine.max_model_len  # what the engine derived


def test_an_int8_cache_needs_calibration_tokens(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="kv_calibration_ids"):
        LLMEngine(model, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=40, kv_dtype="int8")))
