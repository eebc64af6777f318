"""The server through the official openai SDK (and raw HTTP where the SDK cannot misbehave)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, MODEL

PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Name three fruits."}]


def test_completion_stream_joins_to_the_completion(live, client):
    n_prompt = len(live.app.state.loom.tokenizer.encode(PROMPT))
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert full.object == "text_completion" and full.model == MODEL
    choice = full.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("length", "stop") and choice.text
    assert full.usage.completion_tokens == 24 or choice.finish_reason == "stop"
    assert full.usage.prompt_tokens == n_prompt and full.usage.total_tokens == n_prompt + full.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_stream_joins_to_the_chat(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content and full.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.usage.completion_tokens == full.usage.completion_tokens


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert all(v <= 0 for v in lp.token_logprobs)
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(value)  # greedy: chosen is the best
    offsets = [len("".join(lp.tokens[:i])) for i in range(12)]
    assert lp.text_offset == offsets


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert bytes(c.bytes).decode("utf-8") == c.token


def test_echo_scores_the_prompt_like_lm_eval(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    choice = r.choices[0]
    assert choice.text == "The capital of France is Paris"
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == choice.text and r.usage.completion_tokens == 0
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, echo=True, temperature=0)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_n_choices_and_seeds(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0,
                                  seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, temperature=1.0,
                                      seed=7)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=3, temperature=0.9, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=3, temperature=0.9,
                                                   seed=3, stream=True))
    for k in range(3):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == k)
        assert text == chat.choices[k].message.content
        assert sum(1 for c in streamed if c.choices and c.choices[0].index == k and c.choices[0].finish_reason) == 1


def test_multiple_prompts_and_token_ids(client):
    r = client.completions.create(model=MODEL, prompt=["Hello", "One, two,"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_ids = client.completions.create(model=MODEL, prompt=[[19556], [4092, 28, 827, 28]], max_tokens=4,
                                       temperature=0)
    assert len(by_ids.choices) == 2 and all(c.text for c in by_ids.choices)


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0).choices[0].text
    assert " 6," in base
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6,"])
    assert r.choices[0].text == base[: base.index(" 6,")] and r.choices[0].finish_reason == "stop"
    s = list(client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                       stop=" 6,", stream=True))
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_extras_other_engines_accept(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=1,
                                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                              "ignore_eos": True, "min_tokens": 6}, logit_bias={"11": 5},
                                  presence_penalty=0.5, frequency_penalty=0.5)
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(logprobs=21), "logprobs"),
    (dict(presence_penalty=3), "presence_penalty"),
    (dict(logit_bias={"--5": 1}), "logit_bias"),
    (dict(logit_bias={"²": 1}), "logit_bias"),
    (dict(seed=1 << 64), "seed"),
    (dict(extra_body={"max_tokens": "ten"}), "max_tokens"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={"99999999": 1}), "logit_bias"),
    (dict(max_tokens=9000), None),  # prompt + max_tokens beyond the context
    (dict(prompt=[]), "prompt"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_completion_requests_are_400(client, kwargs, param):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    body = e.value.body
    assert set(body) >= {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    if param:
        assert param in (body["param"] or "") or param in body["message"]


@pytest.mark.parametrize("kwargs", [dict(messages=[]), dict(messages=[{"role": "wizard", "content": "hi"}]),
                                    dict(max_completion_tokens=0), dict(top_logprobs=3),
                                    dict(extra_body={"tools": [{"type": "function"}]})])
def test_invalid_chat_requests_are_400(client, kwargs):
    args = dict(model=MODEL, messages=CHAT, max_tokens=4)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**args)


def test_auth_and_unknown_models(live, client):
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert httpx.get(live.url + "/v1/models").status_code == 401
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert client.models.retrieve(MODEL).id == MODEL
    assert [m.id for m in client.models.list()] == [MODEL]


def test_raw_http_edges(live):
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(live.url + "/v1/completions", headers=h, content=b'{"prompt": "x", "max_tokens": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/completions", headers=h, content=b'{"prompt": "\xff\xfe"}')
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/completions", headers=h, content=b"[1, 2]")
    assert r.status_code == 400
    r = httpx.post(live.url + "/v1/completions", headers=h, content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(live.url + "/v1/nothing-here", headers=h)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(live.url + "/v1/completions", headers=h)
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_tokenize_detokenize_metrics(live):
    h = {"Authorization": f"Bearer {API_KEY}"}
    t = httpx.post(live.url + "/tokenize", headers=h, json={"prompt": "The capital of France is"}).json()
    assert t["tokens"] == [504, 3575, 282, 4649, 314] and t["count"] == 5
    chat = httpx.post(live.url + "/tokenize", headers=h, json={"messages": CHAT}).json()
    assert chat["tokens"][:1] == [1] and chat["count"] > 10
    d = httpx.post(live.url + "/detokenize", headers=h, json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == "The capital of France is"
    assert httpx.post(live.url + "/detokenize", headers=h, json={"tokens": [-1]}).status_code == 400
    assert httpx.get(live.url + "/metrics").status_code == 401  # behind the key, like the API
    text = httpx.get(live.url + "/metrics", headers=h).text
    for name in ("loom_num_requests_running", "loom_num_requests_waiting", "loom_kv_cache_blocks_used",
                 "loom_prefix_cache_hit_rate", "loom_prompt_tokens_total", "loom_generation_tokens_total",
                 "loom_time_to_first_token_seconds_bucket", "loom_time_per_output_token_seconds_bucket"):
        assert name in text, name


def test_queue_full_is_503_and_other_servers_keep_serving(live, client):
    from tests.serve.conftest import start_server

    busy = start_server(api_key=None, max_waiting=0, memory="32MiB")
    try:
        c = openai.OpenAI(base_url=busy.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    finally:
        busy.stop()
    # after every refusal above, the main server still answers
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
