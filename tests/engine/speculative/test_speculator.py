"""Speculative decoding inside the engine: greedy outputs equal plain decoding's for every method,
batched and alone, with chunked prefill, small token budgets and preemption; sampling stays exactly
the target's distribution end to end; no KV block leaks, in the target's cache or the draft's."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from loom.engine.engine import LLMEngine
from loom.engine.sampler import sampling_distribution
from loom.engine.speculative.draft import DraftModelProposer
from loom.engine.speculative.window import WindowProposer
from loom.eval.corpora import kv_calibration_ids
from loom.layers.attention import AttentionMetadata
from loom.models.transformer import Transformer
from loom.sampling_params import SamplingParams
from loom.tokenizer import tokenizer_from_gguf_metadata
from tests.helpers import byte_level_metadata
from tests.stats import chi2_critical, chi2_stat

CFG = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
           max_position_embeddings=512)
Z_1E6 = 4.753424


@pytest.fixture(scope="module")
def models():
    target = Transformer(ModelConfig(**CFG)).init_random(0, std=0.15).eval().requires_grad_(False)
    # A draft that agrees with the target often but not always: the target plus noise.
    near = Transformer(ModelConfig(**CFG)).eval().requires_grad_(False)
    near.load_state_dict(target.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.04)
    return target, near, tokenizer_from_gguf_metadata(byte_level_metadata())


def spec_config(method: str, near: Transformer, k: int = 4) -> SpeculativeConfig:
    if method == "draft":
        return SpeculativeConfig("draft", k, draft_model=near)
    if method == "window":  # with 4-token blocks: the first block + the last 8 tokens
        return SpeculativeConfig("window", k, window=8, sink_tokens=4)
    return SpeculativeConfig(method, k)


def make_engine(models, method: str | None, num_blocks: int = 400, prefix: bool = True, k: int = 4,
                **sched) -> LLMEngine:
    target, near, tok = models
    spec = None if method is None else spec_config(method, near, k)
    return LLMEngine(target, tok, EngineConfig(
        cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=prefix),
        scheduler=SchedulerConfig(**sched), speculative=spec))


def check_draft_cache(engine: LLMEngine) -> None:
    drafter = engine.speculator.drafter if engine.speculator is not None else None
    if isinstance(drafter, DraftModelProposer):
        drafter.blocks.check_invariants(list(drafter.shadows.values()))


def run_all(engine: LLMEngine, prompts, params, check: bool = True) -> list[list[int]]:
    outs: dict[str, list[int]] = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
        outs[str(i)] = []
    while engine.has_unfinished_requests():
        for d in engine.step():
            outs[d.request_id].extend(d.token_ids)
        if check:
            engine.block_manager.check_invariants(engine.live_sequences())
            check_draft_cache(engine)
    return [outs[str(i)] for i in range(len(prompts))]


def workload(n: int = 32, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Varied prompts, some repetitive (where n-gram lookup finds matches), with varied lengths, stop
    tokens and penalties."""
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(n):
        if i % 3 == 0:
            unit = [rng.randrange(3, 256) for _ in range(rng.randint(2, 6))]
            prompts.append(unit * rng.randint(2, 6))
        else:
            prompts.append([rng.randrange(3, 256) for _ in range(rng.randint(1, 40))])
        extra = {}
        if i % 5 == 1:
            extra["stop_token_ids"] = [rng.randrange(3, 256) for _ in range(8)]
        if i % 7 == 2:
            extra["repetition_penalty"] = 1.3
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(1, 24), ignore_eos=True, **extra))
    return prompts, params


@pytest.fixture(scope="module")
def plain_outputs(models):
    prompts, params = workload()
    return run_all(make_engine(models, None), prompts, params)


METHODS = ["ngram", "draft", "window"]
SETUPS = {"default": dict(), "small-budget": dict(max_num_batched_tokens=12),
          "preemption": dict(num_blocks=40), "no-prefix-cache": dict(prefix=False),
          "no-chunking": dict(enable_chunked_prefill=False)}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("method", METHODS)
def test_greedy_batched_equals_plain(models, plain_outputs, method, setup):
    prompts, params = workload()
    engine = make_engine(models, method, **SETUPS[setup])
    assert run_all(engine, prompts, params) == plain_outputs
    stats = engine.stats().speculative
    assert stats.passes > 0 and stats.accepted_tokens > 0 and stats.accepted_tokens < stats.draft_tokens
    assert engine.block_manager.num_used_blocks == 0
    if setup == "preemption":
        assert engine.scheduler.num_preemptions > 0
    check_draft_cache(engine)
    if method == "draft":
        assert engine.speculator.drafter.num_used_blocks == 0 and not engine.speculator.drafter.shadows


@pytest.mark.parametrize("method", METHODS)
def test_greedy_alone_equals_plain(models, plain_outputs, method):
    prompts, params = workload()
    engine = make_engine(models, method)
    for i in (0, 3, 4, 9):
        assert run_all(engine, [prompts[i]], [params[i]]) == [plain_outputs[i]]


def test_a_draft_equal_to_the_target_is_always_accepted(models):
    target, _, tok = models
    engine = LLMEngine(target, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=200),
                                                 speculative=SpeculativeConfig("draft", 3, draft_model=target)))
    run_all(engine, [[5, 6, 7], [9, 10]], [SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)] * 2)
    s = engine.stats().speculative
    assert s.acceptance_rate == 1.0 and s.rejections == 0
    assert s.passes == 2 * 5 and s.tokens_per_pass == 4.0 == s.expected_tokens_per_pass  # 20 tokens in 5 passes


def test_logprobs_and_penalties_match_plain_decoding(models):
    prompt = [7, 8, 9, 7, 8, 9, 7, 8]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2, frequency_penalty=0.5)
    outs = {}
    for method in (None, "draft"):
        engine = make_engine(models, method)
        engine.add_request("a", prompt, params)
        deltas = [d for _ in range(100) if engine.has_unfinished_requests() for d in engine.step()]
        outs[method] = ([t for d in deltas for t in d.token_ids], [lp for d in deltas for lp in (d.logprobs or [])])
    (tokens, logprobs), (spec_tokens, spec_logprobs) = outs[None], outs["draft"]
    assert spec_tokens == tokens and len(spec_logprobs) == len(logprobs) == 16
    for a, b in zip(logprobs, spec_logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)


@pytest.mark.parametrize("method", METHODS)
def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(models, method):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7]
    alone = run_all(make_engine(models, method), [prompt], [params])[0]
    busy, others = workload(12, seed=4)
    others = [SamplingParams(temperature=0.8, max_tokens=p.max_tokens, ignore_eos=True) for p in others]
    outs = run_all(make_engine(models, method, num_blocks=60), busy[:6] + [prompt] + busy[6:],
                   others[:6] + [params] + others[6:])
    assert outs[6] == alone


def _exact_joint(target: Transformer, prompt: list[int], params: SamplingParams, length: int) -> dict[tuple, float]:
    """P(t_1..t_length) of plain sampling, computed from the model's distributions one context at a time."""
    def next_dist(ids: list[int]) -> torch.Tensor:
        hidden = target(torch.tensor(ids), AttentionMetadata.uncached([len(ids)]))
        return sampling_distribution(target.compute_logits(hidden[-1:])[0].float(), params)

    joint: dict[tuple, float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, prob in joint.items():
            dist = next_dist(prompt + list(prefix))
            for t in torch.nonzero(dist).flatten().tolist():
                grown[prefix + (t,)] = prob * float(dist[t])
        joint = grown
    return joint


@pytest.fixture(scope="module")
def bigram(models):
    """The target with its attention outputs zeroed: every next-token distribution depends on the last
    token alone, so a continuation seen earlier in the context is a likely one now (n-gram drafts get
    accepted as often as the target samples them)."""
    target, near, tok = models
    model = Transformer(ModelConfig(**CFG)).eval().requires_grad_(False)
    model.load_state_dict(target.state_dict())
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
    return model, near, tok


@pytest.mark.parametrize("method", METHODS)
def test_sampling_is_lossless_end_to_end(models, bigram, method):
    """The joint distribution of 4 sampled tokens (top-k 2: 16 outcomes; passes of k = 2 drafts, so
    rejections, bonus tokens and rollbacks all occur) equals plain sampling's exact one."""
    setup = bigram if method == "ngram" else models
    start = [11, 12, 13, 14]
    if method == "ngram":  # the model's own greedy walk: n-gram lookup proposes its likeliest tokens
        walk = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
        prompt = start + run_all(make_engine(setup, None), [start], [walk])[0]
    else:
        prompt = start * 6
    n = 2000
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s, max_tokens=4, ignore_eos=True) for s in range(n)]
    engine = make_engine(setup, method, k=2, max_num_seqs=256, max_num_batched_tokens=2048)
    samples = [tuple(out) for out in run_all(engine, [prompt] * n, params, check=False)]
    s = engine.stats().speculative
    assert s.passes > n // 2 and 0 < s.accepted_tokens < s.draft_tokens
    joint = _exact_joint(setup[0], prompt, params[0], 4)
    outcomes = {o: i for i, o in enumerate(joint)}
    stat, df = chi2_stat([outcomes[o] for o in samples], {outcomes[o]: p for o, p in joint.items()})
    assert stat < chi2_critical(df, Z_1E6), f"chi2 {stat:.1f}, df {df}"
    assert engine.block_manager.num_used_blocks == 0


def test_window_view_keeps_sink_blocks_and_the_recent_window(models):
    engine = make_engine(models, "window")
    view = engine.speculator.drafter.view  # block size 4, one sink block, window 8
    table = list(range(100, 110))
    assert view(table, 10) == (table[:3], 10)  # short context: everything
    assert view(table, 12) == (table[:3], 12)
    assert view(table, 14) == (table[:4], 14)  # the window (keys 6-13) reaches into block 1: everything
    assert view(table, 17) == ([100, 102, 103, 104], 13)  # keys 0-3 and 8-16
    assert view(table, 37) == ([100, 107, 108, 109], 13)  # keys 0-3 and 28-36


def test_configuration_errors(models):
    target, near, tok = models
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig("beam")
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig("draft")
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig("ngram", 0)
    other = Transformer(ModelConfig(**{**CFG, "vocab_size": 300})).init_random(0)
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(target, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=50),
                                            speculative=SpeculativeConfig("draft", draft_model=other)))
    alibi = Transformer(ModelConfig(**CFG, position="alibi")).init_random(0)
    with pytest.raises(ValueError, match="RoPE"):
        LLMEngine(alibi, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=50),
                                           speculative=SpeculativeConfig("window")))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "abort", "step", "step", "step"]),
                              st.integers(0, 10**6)), min_size=5, max_size=60),
       method=st.sampled_from(METHODS))
def test_no_leaks_under_random_add_abort_step(models, ops, method):
    engine = make_engine(models, method, num_blocks=48)
    ids = itertools.count()
    for op, r in ops:
        rng = random.Random(r)
        if op == "add":
            unit = [rng.randrange(3, 256) for _ in range(rng.randint(1, 5))]
            params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 30),
                                    seed=r, n=rng.choice([1, 1, 2]), ignore_eos=True)
            engine.add_request(str(next(ids)), unit * rng.randint(1, 6), params)
        elif op == "abort" and engine.requests:
            engine.abort_request(rng.choice(sorted(engine.requests)))
        else:
            engine.step()
        engine.block_manager.check_invariants(engine.live_sequences())
        check_draft_cache(engine)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0
    if method == "draft":
        assert engine.speculator.drafter.num_used_blocks == 0 and not engine.speculator.drafter.shadows


def test_stats_reach_the_metrics_endpoint(models):
    from loom.serve.metrics import Metrics

    engine = make_engine(models, "draft")
    run_all(engine, [[1, 2, 3, 1, 2, 3, 1, 2]], [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)])
    s = engine.stats().speculative
    text = Metrics(engine, "tiny").render().decode()
    assert f'loom_spec_decode_num_draft_tokens{{model_name="tiny"}} {float(s.draft_tokens)}' in text
    assert "loom_spec_decode_acceptance_rate" in text and "loom_spec_decode_expected_tokens_per_pass" in text
    # the last token of a request is decoded without drafts (k = 0): both kinds of step were timed
    assert s.plain_step_tokens > 0 and s.spec_step_tokens > s.passes > 0 and s.speedup > 0
    assert f'loom_spec_decode_speedup{{model_name="tiny"}} {s.speedup}' in text


def test_window_proposer_rejects_models_it_cannot_view(models):
    target, _, tok = models
    engine = make_engine(models, None)
    with pytest.raises(ValueError, match="sliding window"):
        WindowProposer(type(engine.runner)(Transformer(ModelConfig(**CFG, sliding_window=16)).init_random(0),
                                           engine.kv_cache), 8, 4, ())


@pytest.mark.parametrize("method", METHODS)
def test_int8_kv_cache_speculates_losslessly(models, method):
    """Verification rows and drafts go through the int8 cache's module path (no scripted step)."""
    target, near, tok = models
    prompts, params = workload(12, seed=7)
    outs = {}
    for spec in (None, spec_config(method, near)):
        engine = LLMEngine(target, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=200, kv_dtype="int8"),
                                                     speculative=spec), kv_calibration_ids=kv_calibration_ids(tok))
        outs[spec is None] = run_all(engine, prompts, params)
        assert engine.block_manager.num_used_blocks == 0
    assert outs[False] == outs[True]
