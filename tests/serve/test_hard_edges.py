"""Hostile and unusual client input: never a 5xx, always OpenAI's error JSON; the fields real clients send by
default; per-request work bounds; the key in front of everything but /health; the API description; a
shutdown that ends each in-flight request with an answer."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time

import httpx
import pytest

from loom.serve import openapi as doc
from tests.serve.conftest import API_KEY, MODEL, start_cli_server

H = {"Authorization": f"Bearer {API_KEY}"}
JSON = H | {"Content-Type": "application/json"}
CHAT = [{"role": "user", "content": "Say hi."}]


def post_raw(live, path: str, content: bytes, headers=JSON) -> httpx.Response:
    return httpx.post(live.url + path, content=content, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, words: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    return error


# Input that used to be a 500 -----------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b", "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udfff"], "max_tokens": 1}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}),
    ("/tokenize", {"prompt": "\udbff"}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "metadata": {"\ud800": 1}}),
])
def test_lone_surrogates_are_400(live, path, body):
    raw = json.dumps(body).encode()  # ensure_ascii spells the surrogate as a \\u escape, valid JSON
    assert_error(post_raw(live, path, raw), 400, "lone surrogate")


def test_python_api_refuses_lone_surrogates(smollm):
    from loom.errors import InvalidPromptError

    with pytest.raises(InvalidPromptError, match="lone surrogate"):
        smollm.generate("a\ud800")


@pytest.mark.parametrize("raw,words", [
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),  # past int()'s digit limit
    (b'{"prompt": "x", "metadata": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested"),  # RecursionError
    (b'{"prompt": "x", "metadata": ' + b"[" * 100 + b"]" * 100 + b"}", "nested"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"prompt": "x", "temperature": -Infinity}', "Infinity"),
    (b'{"prompt": "x", "seed": ' + b"9" * 4000 + b"}", "seed"),
])
def test_hostile_json_is_400(live, raw, words):
    assert_error(post_raw(live, "/v1/completions", raw), 400, words)


def test_non_ascii_authorization_is_401(live):
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x"},
                   headers=[(b"authorization", "Bearer ключ".encode())])
    assert_error(r, 401, "API key")
    r = httpx.get(live.url + "/v1/models", headers=[(b"authorization", b"Bearer \xff\xfe")])
    assert_error(r, 401)


# Fields real clients send ----------------------------------------------------------------------------

CLIENT_FIELDS = {"metadata": {"k": "v"}, "store": False, "service_tier": "auto", "reasoning_effort": "low",
                 "prediction": {"type": "content", "content": "x"}, "prompt_cache_key": "k",
                 "safety_identifier": "s", "verbosity": "low", "include_obfuscation": False}


def test_fields_clients_send_by_default_are_ignored_with_a_warning(live, caplog):
    with caplog.at_level(logging.WARNING, logger="loom.serve"):
        r = httpx.post(live.url + "/v1/chat/completions", headers=H, timeout=60,
                       json={"model": MODEL, "messages": CHAT, "max_tokens": 2, **CLIENT_FIELDS})
        assert r.status_code == 200, r.text
        r = httpx.post(live.url + "/v1/completions", headers=H, timeout=60,
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2, "metadata": {}, "bogus": 1})
        assert r.status_code == 200, r.text
    warnings = " ".join(rec.getMessage() for rec in caplog.records if "ignoring request fields" in rec.getMessage())
    for name in [*CLIENT_FIELDS, "bogus"]:
        assert name in warnings


def stream_events(live, path: str, body: dict) -> list:
    events = []
    with httpx.stream("POST", live.url + path, headers=H, json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


@pytest.mark.parametrize("path,prompt", [("/v1/completions", {"prompt": "Once upon a time"}),
                                         ("/v1/chat/completions", {"messages": CHAT})])
def test_continuous_usage_stats_puts_usage_in_every_chunk(live, path, prompt):
    body = {"model": MODEL, "max_tokens": 6, "ignore_eos": True, "temperature": 0, "stream": True, **prompt,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = stream_events(live, path, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" in c for c in chunks)
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert done == sorted(done) and done[-1] == 6 and chunks[-1]["choices"] == []
    assert len({c["usage"]["prompt_tokens"] for c in chunks}) == 1
    for c in chunks:
        u = c["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_chat_template_kwargs_reach_the_template(live):
    tokenizer = live.app.state.loom.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = "{{ greeting | default('Hello') }}:{% for m in messages %}{{ m.content }}{% endfor %}"
    try:
        for kwargs, text in ((None, "Hello:Say hi."), ({"greeting": "Ahoy"}, "Ahoy:Say hi.")):
            r = httpx.post(live.url + "/v1/chat/completions", headers=H, timeout=60,
                           json={"model": MODEL, "messages": CHAT, "max_tokens": 1, "chat_template_kwargs": kwargs})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(text, add_special_tokens=False))
    finally:
        tokenizer.chat_template = saved
    r = httpx.post(live.url + "/v1/chat/completions", headers=H,
                   json={"model": MODEL, "messages": CHAT, "chat_template_kwargs": {"messages": []}})
    assert_error(r, 400, "messages")


def test_tool_choice_without_tools_is_400(live):
    for choice in ("auto", "none", {"type": "function", "function": {"name": "f"}}):
        r = httpx.post(live.url + "/v1/chat/completions", headers=H,
                       json={"model": MODEL, "messages": CHAT, "tool_choice": choice})
        assert_error(r, 400, "tool_choice")


# Work bounds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,words", [
    ({"prompt": ["a"] * 20000}, "at most 256 prompts"),
    ({"stop": ["x" * 300] * 16}, "at most 4096 characters"),
    ({"stop": [str(i) for i in range(17)]}, "at most 16 stop sequences"),
])
def test_requests_past_the_work_limits_are_400(live, extra, words):
    start = time.time()
    r = httpx.post(live.url + "/v1/completions", headers=H, timeout=60,
                   json={"model": MODEL, "prompt": "x", "max_tokens": 1} | extra)
    assert_error(r, 400, words)
    assert time.time() - start < 10 and not live.engine.requests


def test_a_stalled_body_is_408(live):
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        start = time.time()
        answer = s.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive" in answer
    assert time.time() - start < 10  # the fixture's body timeout is 3 s


# The key, and the API description -------------------------------------------------------------------------


def test_everything_but_health_needs_the_key(live):
    for path in ("/metrics", "/openapi.json", "/docs", "/v1/models"):
        assert_error(httpx.get(live.url + path), 401)
        assert httpx.get(live.url + path, headers=H).status_code == 200
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_the_api_description_has_real_request_and_response_schemas(live):
    spec = httpx.get(live.url + "/openapi.json", headers=H).json()
    posts = {path: ops["post"] for path, ops in spec["paths"].items() if "post" in ops}
    assert set(posts) == {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/responses",
                          "/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank", "/v1/score"}
    for path, op in posts.items():
        schema = resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])
        assert schema["type"] == "object" and schema["properties"], path
        assert {"200", "400", "401", "413", "503"} <= set(op["responses"]), path
        assert "422" not in op["responses"]
    completion = resolve(spec, posts["/v1/completions"]["requestBody"]["content"]["application/json"]["schema"])
    assert {"prompt", "max_tokens", "stream_options", "logit_bias"} <= set(completion["properties"])
    assert "prompt" in completion["required"]
    chat = resolve(spec, posts["/v1/chat/completions"]["requestBody"]["content"]["application/json"]["schema"])
    assert {"messages", "chat_template_kwargs", "tool_choice"} <= set(chat["properties"])
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    ok = resolve(spec, posts["/v1/completions"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert {"id", "choices", "usage"} <= set(ok["properties"])


def test_real_responses_match_the_described_schemas(live):
    r = httpx.post(live.url + "/v1/completions", headers=H, timeout=60,
                   json={"model": MODEL, "prompt": ["Hi", "Yo"], "max_tokens": 3, "logprobs": 2, "echo": True, "n": 2})
    doc.CompletionResponse.model_validate(r.json(), strict=True)
    r = httpx.post(live.url + "/v1/chat/completions", headers=H, timeout=60,
                   json={"model": MODEL, "messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    doc.ChatCompletionResponse.model_validate(r.json(), strict=True)
    events = stream_events(live, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 3,
                                                          "stream": True, "stream_options": {"include_usage": True}})
    for chunk in events[:-1]:
        doc.ChatCompletionChunk.model_validate(chunk, strict=True)
    for chunk in stream_events(live, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                         "stream": True})[:-1]:
        doc.CompletionResponse.model_validate(chunk, strict=True)
    doc.ModelList.model_validate(httpx.get(live.url + "/v1/models", headers=H).json(), strict=True)
    doc.TokenizeResponse.model_validate(httpx.post(live.url + "/tokenize", headers=H, json={"prompt": "a"}).json())
    doc.ErrorResponse.model_validate(httpx.post(live.url + "/tokenize", headers=H, json={}).json(), strict=True)


# Shutdown past the graceful timeout ------------------------------------------------------------------------


def test_shutdown_past_the_graceful_timeout_answers_every_request():
    proc, url = start_cli_server("--kv-cache-memory", "256MiB", "--graceful-timeout", "1")
    long = {"model": MODEL, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    results: dict[str, object] = {}

    def plain():
        r = httpx.post(url + "/v1/completions", json=long, timeout=120)
        results["plain"] = (r.status_code, r.json())

    def streamed():
        with httpx.stream("POST", url + "/v1/completions", json=long | {"stream": True}, timeout=120) as r:
            results["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    try:
        threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # both are generating
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    status, body = results["plain"]
    assert status == 503 and body["error"]["type"] == "service_unavailable"
    assert "shutting down" in body["error"]["message"]
    events = results["stream"]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["message"] == "the server is shutting down"
    assert len(events) > 3  # tokens were streamed before
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert log.count("end with 503") == 1, log


# The tokenizer, for clients that tokenize themselves ----------------------------------------------------------


def test_tokenizer_info_and_files_tokenize_as_the_server_does(live, tmp_path):
    info = httpx.get(live.url + "/tokenizer_info", headers=H).json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>"
    assert info["chat_template"] and info["model_max_length"] == live.engine.max_model_len
    assert info["vocab_size"] == 49152 and isinstance(info["add_bos_token"], bool)
    # lm-evaluation-harness derives the special tokens' ids by tokenizing their text
    eos = httpx.post(live.url + "/tokenize", headers=H, json={"prompt": info["eos_token"],
                                                              "add_special_tokens": False}).json()
    assert eos["tokens"] == list(live.app.state.loom.tokenizer.eos_token_ids[:1])

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        r = httpx.get(live.url + "/tokenizer/" + name, headers=H)
        assert r.status_code == 200
        (tmp_path / name).write_bytes(r.content)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("The capital of France is", "  spaces\tand\nlines, ünïcödé 😀", "<|im_start|>user\nhi<|im_end|>"):
        for special in (True, False):
            ids = httpx.post(live.url + "/tokenize", headers=H,
                             json={"prompt": text, "add_special_tokens": special}).json()["tokens"]
            assert hf.encode(text, add_special_tokens=special) == ids, (text, special)
    served = httpx.post(live.url + "/tokenize", headers=H, json={"messages": CHAT}).json()["tokens"]
    assert hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False) == served
