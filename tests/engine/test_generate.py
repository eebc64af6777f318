"""Generation on the real model: streaming, stop conditions, seeds, and bad requests."""

from __future__ import annotations

import pytest

from loom.errors import ContextLengthError
from loom.outputs import Timings
from loom.sampling_params import SamplingParams

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def stream_text(llm, prompt, params):
    deltas = list(llm.stream(prompt, params))
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason is not None
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas[-1]


def test_eos_ends_a_chat_answer(smollm):
    out = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=64))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == 2
    assert "Paris" in out.text and "<|im_end|>" not in out.text
    assert out.token_ids[-1] == 2


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24),
    SamplingParams(temperature=0, max_tokens=40, stop=[" the", "."]),
    SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=30),
])
def test_streamed_text_joins_to_the_completion(smollm, params):
    prompt = "Once upon a time, in a small village by the sea,"
    text, tokens, last = stream_text(smollm, prompt, params)
    out = smollm.generate(prompt, params)[0]
    assert text == out.text and tokens == out.token_ids
    assert last.finish_reason == out.finish_reason


def test_stop_string_is_cut(smollm):
    full = smollm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))[0].text
    assert "." in full
    out = smollm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=["."]))[0]
    assert out.text == full[: full.index(".")] and out.finish_reason == "stop" and out.outputs[0].stop_reason == "."


def test_stop_token_ids_and_max_tokens(smollm):
    base = smollm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=10))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    stop_at = base.token_ids[3]
    out = smollm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))[0]
    first = base.token_ids.index(stop_at)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at


def test_seeded_sampling_is_reproducible(smollm):
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=20, ignore_eos=True)
    a = smollm.generate("Tell me a story", p)[0].token_ids
    b = smollm.generate("Tell me a story", p)[0].token_ids
    c = smollm.generate("Tell me a story", SamplingParams(temperature=1.0, seed=43, max_tokens=20, ignore_eos=True))[0]
    assert a == b and a != c.token_ids


def test_batch_of_prompts_in_order(smollm):
    prompts = ["The capital of France is", [504, 3575, 282, 4649, 314], "2 + 2 ="]
    outs = smollm.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
    assert outs[0].token_ids == outs[1].token_ids  # the same prompt, as text and as ids
    assert outs[0].prompt_token_ids == [504, 3575, 282, 4649, 314]
    assert outs[2].prompt == "2 + 2 =" and outs[1].prompt is None
    two = smollm.chat([CHAT, CHAT], SamplingParams(temperature=0, max_tokens=8))
    assert two[0].text == two[1].text


def test_timings(smollm):
    t = Timings()
    list(smollm.stream("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), t))
    assert t.prompt_tokens == 1 and t.generated_tokens == 8 and t.prefill > 0 and t.decode_tokens_per_s > 0


def test_bad_requests_are_refused_clearly(smollm):
    ctx = smollm.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="prompt has 8192 tokens"):
        smollm.generate([[5] * ctx], SamplingParams(max_tokens=1))
    with pytest.raises(ContextLengthError, match="exceeds the model's context"):
        smollm.generate([[5] * (ctx - 10)], SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="empty"):
        smollm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="token ids must be in"):
        smollm.generate([[5, 49152]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="got 1 SamplingParams for 2 prompts"):
        smollm.generate(["a", "b"], [SamplingParams()])
    # After refusals, it still works.
    assert smollm.generate("Hi", SamplingParams(temperature=0, max_tokens=2))[0].finish_reason == "length"
