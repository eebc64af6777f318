"""T5 through ``LLM.generate`` (engine/encoder_decoder.py): greedy tokens equal transformers' ``generate``; prompts
of different lengths batched together (continuous batching, requests arriving mid-stream, preemption) give each
prompt's tokens alone; the encoder and the cross-attention K/V run once per request, and their memory is freed
when the request finishes or is aborted."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from loom import LLM, SamplingParams
from loom.config import CacheConfig, KVPolicyConfig, SchedulerConfig, SpeculativeConfig
from loom.errors import ContextLengthError, InvalidPromptError, InvalidRequestError
from tests.t5_checkpoints import save_byte_tokenizer, save_tiny_t5

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 3], list(range(20, 50)), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [200]]
# seeds and sizes whose greedy tokens vary (tiny random models often repeat one token)
CHECKPOINTS = {"t5-relu-tied": dict(feed_forward="relu", tied=True, seed=2, d_model=64, std=0.6),
               "flan-t5-gated-gelu-untied": dict(feed_forward="gated-gelu", tied=False, seed=2)}


def small_engine(**cache) -> dict:
    """Blocks of 4 tokens and 16-token steps: sequences span many blocks and decodes run batched."""
    return dict(cache=CacheConfig(block_size=4, **({"num_blocks": 128} | cache)),
                scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8))


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """(folder, transformers' model) of a tiny T5 with the byte-level tokenizer."""
    folder = str(tmp_path_factory.mktemp(request.param))
    hf = save_tiny_t5(folder, **CHECKPOINTS[request.param])
    save_byte_tokenizer(folder)
    return folder, hf


@pytest.fixture(scope="module")
def llm(checkpoint) -> LLM:
    return LLM(checkpoint[0], **small_engine())


def hf_greedy(hf, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    assert out[0, 0].item() == hf.config.decoder_start_token_id
    return out[0, 1:].tolist()


def test_greedy_equals_transformers(checkpoint, llm):
    _, hf = checkpoint
    seen = set()
    for ids in PROMPTS:
        out = llm.generate([ids], GREEDY)[0]
        assert out.token_ids == hf_greedy(hf, ids)
        assert out.prompt_token_ids == ids and out.finish_reason == "length"
        seen |= set(out.token_ids)
    assert len(seen) >= 20  # the tiny model's tokens vary with the prompt: a real comparison
    text = "Translate: the cat sat."
    out = llm.generate(text, GREEDY)[0]
    assert out.prompt == text and out.token_ids == hf_greedy(hf, llm.tokenizer.encode(text))
    assert out.text  # detokenized as for a decoder (random bytes: not always valid UTF-8, so not compared)


def test_a_batch_equals_each_prompt_alone(checkpoint, llm):
    alone = [llm.generate([ids], GREEDY)[0].token_ids for ids in PROMPTS]
    together = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in together] == alone
    # different lengths: requests finish at different steps while the others go on
    params = [SamplingParams(temperature=0, max_tokens=k, min_tokens=k) for k in (5, 32, 17, 9, 24)]
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == [a[:p.max_tokens] for a, p in zip(alone, params)]


def test_requests_joining_a_running_batch(checkpoint, llm):
    """Continuous batching: requests added while others decode get the tokens they get alone."""
    engine = llm.engine
    alone = {i: llm.generate([ids], GREEDY)[0].token_ids for i, ids in enumerate(PROMPTS)}
    got: dict[int, list[int]] = {i: [] for i in alone}
    pending = list(alone)
    steps = 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 3 == 0:
            i = pending.pop(0)
            engine.add_request(f"join-{i}", PROMPTS[i], GREEDY)
        for d in engine.step():
            got[int(d.request_id.split("-")[1])] += d.token_ids
        steps += 1
    assert got == alone


def test_the_encoder_runs_once_per_request(checkpoint, llm, monkeypatch):
    calls = {"encode": 0, "cross_kv": 0}
    model = llm.engine.model
    for name in calls:
        original = getattr(model, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(model, name, counted)
    before = llm.engine.cross.num_encoded
    outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=NEW_TOKENS,
                                                    min_tokens=NEW_TOKENS))
    assert all(len(c.token_ids) == NEW_TOKENS for o in outs for c in o.outputs)
    assert calls == {"encode": 3, "cross_kv": 3}  # 3 requests, 6 sequences, 32 steps: one encoder run each
    assert llm.engine.cross.num_encoded - before == 3


def test_preemption_keeps_the_cross_attention_cache(checkpoint):
    """A KV cache of 24 blocks of 4 (96 tokens) for 5 sequences of 33 decoder tokens: sequences are preempted and
    recompute their decoder K/V; the encoder never runs again and every sequence gets its tokens alone."""
    folder, hf = checkpoint
    llm = LLM(folder, **small_engine(num_blocks=24))
    outs = llm.generate(PROMPTS, GREEDY)
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.cross.num_encoded == len(PROMPTS)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, ids) for ids in PROMPTS]


def test_cross_attention_memory_is_freed(checkpoint, llm):
    cross = llm.engine.cross
    kept: list[weakref.ref] = []
    original = cross.get

    def watched(request_id):
        kv = original(request_id)
        kept.append(weakref.ref(kv.k))
        return kv

    cross.get = watched
    try:
        stream = llm.stream(PROMPTS[2], GREEDY)
        next(stream)
        assert len(cross) == 1 and cross.nbytes == llm.engine.model.config.cross_kv_bytes(len(PROMPTS[2]))
        stream.close()  # aborts the request
        assert len(cross) == 0 and cross.nbytes == 0
        llm.generate(PROMPTS, GREEDY)
        assert len(cross) == 0 and cross.nbytes == 0 and not cross.entries and not cross.sources
    finally:
        del cross.get
    gc.collect()
    assert kept and all(ref() is None for ref in kept)  # the K/V tensors themselves are gone


def test_sampling_params(checkpoint, llm):
    _, hf = checkpoint
    greedy = hf_greedy(hf, PROMPTS[0])
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, n=2, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS))
    assert [c.token_ids for c in out[0].outputs] == [greedy, greedy]
    stop = greedy[6]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[:greedy.index(stop) + 1]
    full = llm.generate([PROMPTS[0]], GREEDY)[0].text
    stop_at = next(i for i, ch in enumerate(full) if i > 0 and ch.isascii() and ch.isprintable())
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop=[full[stop_at]]))[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index(full[stop_at])]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, n=2, max_tokens=12)
    a, b = llm.generate([PROMPTS[1]], seeded)[0], llm.generate([PROMPTS[1]], seeded)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids


def test_refusals(checkpoint, llm):
    folder, _ = checkpoint
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        llm.generate([PROMPTS[0]], SamplingParams(prompt_logprobs=1))
    with pytest.raises(InvalidPromptError):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidPromptError):
        llm.generate([[256]], GREEDY)
    with pytest.raises(ContextLengthError, match="encoder"):
        llm.generate([[5] * 513], GREEDY)
    with pytest.raises(InvalidRequestError, match="encoder-decoder"):
        llm.embed("hello")
    with pytest.raises(InvalidRequestError, match="KV policy"):
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, kv_policy=KVPolicyConfig("streaming", budget=32)))
    with pytest.raises(ValueError, match="speculative decoding"):
        LLM(folder, speculative=SpeculativeConfig("ngram"))
    with pytest.raises(ValueError, match="int8 KV cache"):
        LLM(folder, cache=CacheConfig(kv_dtype="int8"))
    assert len(llm.engine.cross) == 0 and not llm.engine.requests  # nothing was queued
