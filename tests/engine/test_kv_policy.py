"""KV eviction policies (window, StreamingLLM, H2O) in the paged engine, against a literal reference.

The reference below keeps, per layer and KV head, a Python list of (position, unrotated key, value,
accumulated attention) and applies each policy's rule by sorting; attention is the softmax formula with
RoPE applied by the pair-rotation formula at ranks 0..n-1. The engine's implementation (slots, free
lists, gathers, tensor top-k) must produce the same logits step by step.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from loom.config import CacheConfig, EngineConfig, KVPolicyConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from loom.engine.engine import LLMEngine
from loom.engine.kv_policy import EvictingKV
from loom.eval.corpora import kv_calibration_ids
from loom.models.transformer import Transformer
from loom.sampling_params import SamplingParams
from loom.tokenizer import tokenizer_from_gguf_metadata
from tests.helpers import byte_level_metadata

CFG = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
           max_position_embeddings=512)
POLICIES = ("window", "streaming", "h2o")


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(ModelConfig(**CFG)).init_random(0, std=0.15)
    model.eval().requires_grad_(False)
    return model, tokenizer_from_gguf_metadata(byte_level_metadata())


def make_engine(tiny, policy: KVPolicyConfig | None, num_blocks: int = 200, **sched) -> LLMEngine:
    model, tok = tiny
    return LLMEngine(model, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=num_blocks),
                                              scheduler=SchedulerConfig(**sched), kv_policy=policy))


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0, **kw)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], check: bool = False,
        on_step=None) -> dict[str, tuple[list[int], list[float]]]:
    """Token ids and chosen-token logprobs of each request (index 0)."""
    out: dict[str, tuple[list[int], list[float]]] = {rid: ([], []) for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.index == 0:
                out[d.request_id][0].extend(d.token_ids)
                out[d.request_id][1].extend(lp[t].logprob for t, lp in zip(d.token_ids, d.logprobs or []))
        if check:
            engine.block_manager.check_invariants(engine.live_sequences())
        if on_step is not None:
            on_step(engine)
    return out


# The reference ---------------------------------------------------------------------------------

def rotate(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """RoPE of one head vector [D]: pair (x_i, x_{i + D/2}) rotated by position * theta^(-2i/D)."""
    d = x.shape[0]
    out = x.clone().double()
    for i in range(d // 2):
        a = position * theta ** (-2 * i / d)
        x1, x2 = float(x[i]), float(x[i + d // 2])
        out[i] = x1 * math.cos(a) - x2 * math.sin(a)
        out[i + d // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def keep_rule(policy: KVPolicyConfig, entries: list[dict]) -> list[dict]:
    """The entries (in sequence order) the policy keeps, written from its definition."""
    b = policy.budget
    if len(entries) <= b:
        return entries
    if policy.kind == "window":
        return entries[-b:]
    if policy.kind == "streaming":
        s = policy.sink_tokens
        return entries[:s] + entries[-(b - s):]
    r = max(1, round(b * policy.recent_fraction))
    older, recent = entries[:-r], entries[-r:]
    heavy = sorted(older, key=lambda e: -e["score"])[: b - r]
    return sorted(heavy, key=lambda e: e["pos"]) + recent


@torch.no_grad()
def reference_logits(model: Transformer, tokens: list[int], chunks: list[int], policy: KVPolicyConfig) -> list[torch.Tensor]:
    """Logits at the last token of each chunk of ``tokens`` (chunk sizes ``chunks``), computing the
    chunks in order over a cache that ``policy`` trims after each one."""
    c = model.config
    groups, d = c.num_heads // c.num_kv_heads, c.head_dim
    kept = [[[] for _ in range(c.num_kv_heads)] for _ in range(c.num_layers)]
    out, start = [], 0
    for m in chunks:
        ids = torch.tensor(tokens[start:start + m])
        h = model.embed_tokens(ids)
        for li, layer in enumerate(model.layers):
            qkv = layer.attn.qkv_proj(layer.attn_norm(h)).view(m, -1, d)
            q, k, v = qkv[:, :c.num_heads], qkv[:, c.num_heads:c.num_heads + c.num_kv_heads], qkv[:, c.num_heads + c.num_kv_heads:]
            attn = torch.zeros(m, c.num_heads, d, dtype=torch.float64)
            for g in range(c.num_kv_heads):
                entries = kept[li][g] + [dict(pos=start + t, k=k[t, g], v=v[t, g], score=0.0) for t in range(m)]
                n0 = len(kept[li][g])
                keys = torch.stack([rotate(e["k"], r, c.rope_theta) for r, e in enumerate(entries)])
                values = torch.stack([e["v"].double() for e in entries])
                for hh in range(g * groups, (g + 1) * groups):
                    for t in range(m):
                        qr = rotate(q[t, hh], n0 + t, c.rope_theta)
                        visible = n0 + t + 1
                        p = torch.softmax(keys[:visible] @ qr / math.sqrt(d), dim=0)
                        attn[t, hh] = p @ values[:visible]
                        for j in range(visible):
                            entries[j]["score"] += float(p[j])
                kept[li][g] = keep_rule(policy, entries)
            h = h + layer.attn.o_proj(attn.reshape(m, -1).float())
            h = h + layer.mlp(layer.mlp_norm(h))
        out.append(model.compute_logits(model.norm(h))[-1])
        start += m
    return out


def schedule(prompt_len: int, generated: int, chunk: int) -> list[int]:
    """How the engine groups a bounded sequence's tokens into steps: prompt chunks, then one by one."""
    chunks = [min(chunk, prompt_len - s) for s in range(0, prompt_len, chunk)]
    return chunks + [1] * (generated - 1)


# Tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", POLICIES)
def test_engine_equals_the_reference(tiny, kind):
    """Prompt of 23 in chunks of 8 under a budget of 10 (2 sinks; H2O keeps 5 recent + 5 heavy), 20
    generated: every step's logits equal the literal reference."""
    model, _ = tiny
    policy = KVPolicyConfig(kind, budget=10, sink_tokens=2, prefill_chunk=8)
    ids = prompt(23)
    tokens, logprobs = run(make_engine(tiny, policy), {"a": (ids, greedy(20))})["a"]
    chunks = schedule(len(ids), len(tokens), 8)
    ref = reference_logits(model, ids + tokens, chunks, policy)[len(chunks) - len(tokens):]  # from the prompt's end
    for step, (token, lp, logits) in enumerate(zip(tokens, logprobs, ref)):
        assert token == int(logits.argmax()), f"step {step}"
        assert lp == pytest.approx(float(torch.log_softmax(logits.double(), -1)[token]), abs=1e-4), f"step {step}"


def test_policies_differ(tiny):
    """A test that cannot tell the policies apart would pass for any of them: check it can."""
    outs = {kind: run(make_engine(tiny, KVPolicyConfig(kind, budget=10, sink_tokens=2, prefill_chunk=8)),
                      {"a": (prompt(23), greedy(30))})["a"][1] for kind in POLICIES}
    assert outs["window"] != outs["streaming"] != outs["h2o"] != outs["window"]


@pytest.mark.parametrize("kind", POLICIES)
def test_a_budget_that_holds_everything_changes_nothing(tiny, kind):
    ids = prompt(30, seed=1)
    plain = run(make_engine(tiny, None), {"a": (ids, greedy(40))})["a"]
    bounded = run(make_engine(tiny, KVPolicyConfig(kind, budget=100, prefill_chunk=8)), {"a": (ids, greedy(40))})["a"]
    assert bounded[0] == plain[0]
    assert bounded[1] == pytest.approx(plain[1], abs=1e-5)


def test_full_policy_is_the_plain_engine(tiny):
    ids = prompt(30, seed=2)
    plain = run(make_engine(tiny, None), {"a": (ids, greedy(20))})["a"]
    assert run(make_engine(tiny, KVPolicyConfig("full")), {"a": (ids, greedy(20))})["a"] == plain
    assert run(make_engine(tiny, None), {"a": (ids, greedy(20, kv_policy=KVPolicyConfig("full")))})["a"] == plain


@pytest.mark.parametrize("kind", POLICIES)
def test_memory_stays_constant(tiny, kind):
    """150 tokens under a budget of 16: the sequence's blocks stop growing at budget + one prompt chunk,
    and every block is free once it ends."""
    policy = KVPolicyConfig(kind, budget=16, prefill_chunk=4)
    engine = make_engine(tiny, policy)
    used: list[int] = []
    run(engine, {"a": (prompt(10), greedy(150))}, check=True,
        on_step=lambda e: used.append(e.block_manager.num_used_blocks))
    cap_blocks = -(-policy.capacity // 4)
    assert max(used) == cap_blocks
    assert used[-2] == cap_blocks and used.index(cap_blocks) < 20  # reached early, then flat
    assert engine.block_manager.num_used_blocks == 0


def test_kept_tokens_follow_the_rule(tiny):
    """Streaming keeps positions 0..S-1 and the last B - S in every layer and head; H2O keeps its recent
    window in every head, heavy hitters chosen per head."""
    seen = {}

    def grab(engine):
        for seq in engine.live_sequences():
            if seq.eviction is not None and seq.eviction.kv is not None and seq.num_output == 25:
                seen[seq.eviction.policy.kind] = [layer.positions.clone() for layer in seq.eviction.kv.layers]

    for kind in ("streaming", "h2o"):
        run(make_engine(tiny, KVPolicyConfig(kind, budget=12, sink_tokens=3, prefill_chunk=4)),
            {"a": (prompt(20), greedy(30))}, on_step=grab)
    last = 20 + 25 - 2  # the newest token with K/V computed (the 25th output is not computed yet)
    for positions in seen["streaming"]:
        expect = list(range(3)) + list(range(last - 8, last + 1))
        assert positions.tolist() == [expect] * CFG["num_kv_heads"]
    for positions in seen["h2o"]:
        assert positions[:, -6:].tolist() == [list(range(last - 5, last + 1))] * CFG["num_kv_heads"]
        assert all(row == sorted(row) and len(set(row)) == 12 for row in positions.tolist())


@pytest.mark.parametrize("kind", POLICIES)
def test_batched_and_preempted_equal_alone(tiny, kind):
    """Bounded and plain requests together, with a KV pool small enough to preempt: each output equals
    the request run alone (a preempted bounded sequence replays its steps exactly)."""
    policy = KVPolicyConfig(kind, budget=12, sink_tokens=2, prefill_chunk=8)
    requests = {str(i): (prompt(5 + 7 * i, seed=i), greedy(25 + 5 * i, kv_policy=policy if i % 2 else None))
                for i in range(4)}
    alone = {rid: run(make_engine(tiny, None), {rid: r})[rid] for rid, r in requests.items()}
    engine = make_engine(tiny, None, num_blocks=16, max_num_batched_tokens=20)
    together = run(engine, requests, check=True)
    assert engine.scheduler.num_preemptions > 0
    for rid in requests:
        assert together[rid][0] == alone[rid][0], rid
        assert together[rid][1] == pytest.approx(alone[rid][1], abs=1e-5)
    assert engine.block_manager.num_used_blocks == 0


def test_parallel_sampling_and_abort(tiny):
    """n = 3 under a policy: three completions, each computing the prompt itself; seeded outputs repeat;
    aborting mid-way frees everything."""
    policy = KVPolicyConfig("streaming", budget=12, sink_tokens=2, prefill_chunk=8)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=20, ignore_eos=True, kv_policy=policy)

    def outputs():
        engine = make_engine(tiny, None)
        engine.add_request("a", prompt(15), params)
        got: dict[int, list[int]] = {}
        while engine.has_unfinished_requests():
            for d in engine.step():
                got.setdefault(d.index, []).extend(d.token_ids)
        return got

    first = outputs()
    assert sorted(first) == [0, 1, 2] and all(len(t) == 20 for t in first.values())
    assert first == outputs()
    engine = make_engine(tiny, None)
    engine.add_request("a", prompt(15), params)
    for _ in range(5):
        engine.step()
    engine.abort_request("a")
    engine.step()
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_runs_past_the_model_context(tiny):
    """Positions stay inside the cache: 150 tokens from a model whose context is 48."""
    model = Transformer(ModelConfig(**{**CFG, "max_position_embeddings": 48})).init_random(0, std=0.15)
    engine = make_engine((model, tiny[1]), KVPolicyConfig("streaming", budget=32, prefill_chunk=8))
    tokens = run(engine, {"a": (prompt(40), greedy(150))})["a"][0]
    assert len(tokens) == 150
    with pytest.raises(ValueError, match="context"):
        make_engine((model, tiny[1]), None).add_request("b", prompt(40), greedy(150))


def test_prompt_logprobs_under_a_policy(tiny):
    """Teacher forcing through prompt_logprobs (how the long-context experiment scores text) equals the
    reference's logits with chunks of 1."""
    model, _ = tiny
    policy = KVPolicyConfig("h2o", budget=8, prefill_chunk=1)
    ids = prompt(24, seed=3)
    engine = make_engine(tiny, policy)
    engine.add_request("a", ids, SamplingParams(max_tokens=1, prompt_logprobs=0))
    lps = []
    while engine.has_unfinished_requests():
        for d in engine.step():
            if d.prompt_logprobs is not None:
                lps = [entry[t].logprob for t, entry in zip(ids[1:], d.prompt_logprobs[1:])]
    ref = reference_logits(model, ids, [1] * len(ids), policy)
    want = [float(torch.log_softmax(logits.double(), -1)[t]) for logits, t in zip(ref, ids[1:])]
    assert lps == pytest.approx(want, abs=1e-4)


def test_bad_policies_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="budget"):
        KVPolicyConfig("streaming")
    with pytest.raises(ValueError, match="sink_tokens"):
        KVPolicyConfig("streaming", budget=4, sink_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        KVPolicyConfig("lru", budget=4)
    with pytest.raises(ValueError, match="context"):
        make_engine(tiny, KVPolicyConfig("window", budget=500, prefill_chunk=64))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_engine(tiny, KVPolicyConfig("window", budget=16, prefill_chunk=64), max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="int8"):
        LLMEngine(model, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=200, kv_dtype="int8"),
                                           kv_policy=KVPolicyConfig("window", budget=16)),
                  kv_calibration_ids=kv_calibration_ids(tok))
    with pytest.raises(ValueError, match="speculative"):
        LLMEngine(model, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=200),
                                           speculative=SpeculativeConfig("ngram"),
                                           kv_policy=KVPolicyConfig("window", budget=16)))
    alibi = Transformer(ModelConfig(**{**CFG, "position": "alibi"})).init_random(0)
    with pytest.raises(ValueError, match="RoPE"):
        LLMEngine(alibi, tok, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=200),
                                           kv_policy=KVPolicyConfig("window", budget=16)))
    engine = make_engine(tiny, None)
    with pytest.raises(ValueError, match="context"):  # a per-request policy is checked too, and nothing is queued
        engine.add_request("a", [5, 6], SamplingParams(kv_policy=KVPolicyConfig("h2o", budget=480, prefill_chunk=64)))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="bounded"):
        EvictingKV(KVPolicyConfig("full"), 2, 2, 4)



def test_smollm_greedy_is_unchanged_by_a_budget_that_holds_everything(smollm_native):
    """The real model: a streaming or H2O budget larger than the sequence changes no greedy token; a
    small window does change them (the policy is really on)."""
    engine = smollm_native.engine
    ids = smollm_native.tokenizer.encode("The history of the printing press begins")

    def greedy_ids(name: str, policy: KVPolicyConfig | None) -> list[int]:
        return run(engine, {name: (ids, greedy(48, kv_policy=policy))})[name][0]

    plain = greedy_ids("plain", None)
    assert greedy_ids("streaming", KVPolicyConfig("streaming", budget=128, prefill_chunk=16)) == plain
    assert greedy_ids("h2o", KVPolicyConfig("h2o", budget=128, prefill_chunk=16)) == plain
    assert greedy_ids("window", KVPolicyConfig("window", budget=16, prefill_chunk=8)) != plain
