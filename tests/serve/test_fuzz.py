"""Fuzzing the server: whatever a client sends, the answer is never a 5xx, every refusal is OpenAI's error
JSON, and the server is healthy afterwards with no request left behind.

Two generators: hypothesis over the request shapes (the models' own field names with JSON values of any
type, strings with any code point, raw bytes), and schemathesis over the server's own /openapi.json
(bodies that follow the published schemas, and bodies that break them). Generated requests are clamped
to a few tokens each so the run stays short; ``LOOM_FUZZ_EXAMPLES=N`` runs N examples each (the longer
run in docs/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.serve.app import api_description
from loom.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from loom.serve.responses import ResponsesRequest
from tests.serve.conftest import API_KEY, MODEL

H = {"Authorization": f"Bearer {API_KEY}"}
# examples per endpoint (hypothesis) and per operation (schemathesis); LOOM_FUZZ_EXAMPLES=N for a longer run
HYPOTHESIS_EXAMPLES = int(os.environ.get("LOOM_FUZZ_EXAMPLES", 150))
SCHEMATHESIS_EXAMPLES = int(os.environ.get("LOOM_FUZZ_EXAMPLES", 60))
# CI draws the same examples every run (a failure there is a regression, not luck); longer runs explore
DERANDOMIZE = "LOOM_FUZZ_EXAMPLES" not in os.environ
ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
             "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest, "/v1/responses": ResponsesRequest}

# any code point, surrogates included (JSON can spell them; UTF-8 cannot)
strings = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
scalars = st.none() | st.booleans() | st.integers() | st.integers(-(10**30), 10**30) | \
    st.floats(allow_nan=False, allow_infinity=False) | strings
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(strings, inner, max_size=3), max_leaves=10)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 5]),
                                           "content": strings | st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["text", "image_url"]),
                                                "text": strings}), max_size=2)}), max_size=3)
plausible = {"prompt": strings | st.lists(strings, max_size=3) | st.lists(st.integers(-5, 60000), max_size=4) |
             st.lists(st.lists(st.integers(0, 49151), min_size=1, max_size=4), max_size=2),
             "messages": messages, "tokens": st.lists(st.integers(-5, 60000), max_size=4),
             "logit_bias": st.dictionaries(strings | st.sampled_from(["5", "-5", "--5", "\u00b2", "0"]),
                                           st.floats(-200, 200), max_size=2),
             "stop": strings | st.lists(strings, max_size=3), "stream_options": st.fixed_dictionaries(
                 {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}),
             "max_tokens": st.integers(1, 3) | st.none(), "max_completion_tokens": st.integers(1, 3),
             "n": st.integers(1, 2), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
             "top_k": st.integers(-1, 60000), "min_p": st.floats(0, 1), "seed": st.integers(0, 2**64 - 1),
             "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
             "repetition_penalty": st.floats(0.01, 10), "logprobs": st.integers(0, 20) | st.booleans(),
             "top_logprobs": st.integers(0, 20), "echo": st.booleans(), "stream": st.booleans(),
             "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 2), "add_special_tokens": st.booleans(),
             "stop_token_ids": st.lists(st.integers(0, 49151), max_size=2), "skip_special_tokens": st.booleans(),
             "chat_template_kwargs": st.dictionaries(strings, json_values, max_size=2),
             "tool_choice": st.none() | st.sampled_from(["auto", "none", "required"]) | st.fixed_dictionaries(
                 {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])}),
                  "name": st.sampled_from(["f", "g"])}),
             "add_generation_prompt": st.booleans(), "max_output_tokens": st.integers(1, 3)}
# function tools, in the chat shape ({"function": {...}}) and the Responses shape (flat)
functions = st.fixed_dictionaries({"name": st.sampled_from(["f", "g", "bad name"]), "parameters": st.sampled_from([
    {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}, {"type": "object"},
    {"type": "array", "uniqueItems": True}, {"$ref": "#/$defs/missing"}])})
plausible["tools"] = st.lists(functions.map(lambda f: {"type": "function", "function": f}) |
                              functions.map(lambda f: {"type": "function", **f}), max_size=2)
items = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "developer", "tool"]),
                               "content": strings | st.lists(st.fixed_dictionaries(
                                   {"type": st.sampled_from(["input_text", "output_text", "input_image"]),
                                    "text": strings}), max_size=2)}) | \
    st.fixed_dictionaries({"type": st.sampled_from(["function_call", "function_call_output", "reasoning", "x"]),
                           "call_id": st.sampled_from(["c1", "c2"]), "name": st.sampled_from(["f", "g"]),
                           "arguments": st.sampled_from(["{}", '{"x": 1}', "{oops"]), "output": strings})
plausible["input"] = strings | st.lists(items, max_size=4)
plausible["messages"] = messages | st.lists(st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.none(), "tool_calls": st.lists(st.fixed_dictionaries(
        {"id": st.sampled_from(["c1", "c2"]), "type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["f", "g"]), "arguments": st.sampled_from(["{}", "{oops"])})}), max_size=2)}) |
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.sampled_from(["c1", "c2"]), "content": strings}) |
    st.fixed_dictionaries({"role": st.just("user"), "content": strings}), min_size=1, max_size=4)


REQUIRED = {CompletionRequest: ["prompt"], ChatCompletionRequest: ["messages"], TokenizeRequest: ["prompt"],
            DetokenizeRequest: ["tokens"], ResponsesRequest: ["input"]}


def body_for(model: type) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts over the model's field names: plausible values for the fields (the prompt always), sometimes
    with one field (or an unknown one) holding any JSON value, sometimes any JSON value everywhere."""
    names = sorted(model.model_fields) + ["metadata", "x"]
    required = {k: plausible[k] for k in REQUIRED[model]}
    typed = st.fixed_dictionaries(required, optional={k: v for k, v in plausible.items()
                                                      if k in names and k not in required})
    one_odd = st.dictionaries(st.sampled_from(names), json_values, max_size=1)
    anything = st.dictionaries(st.sampled_from(names), json_values, max_size=5)
    return typed | st.tuples(typed, one_odd).map(lambda pair: pair[0] | pair[1]) | anything


def clamp(body: Any) -> Any:
    """Keep a generated request cheap to serve: at most 3 tokens, 2 choices, 3 prompts."""
    if not isinstance(body, dict):
        return body
    for key, most in (("max_tokens", 3), ("max_completion_tokens", 3), ("max_output_tokens", 3), ("n", 2),
                      ("best_of", 2), ("min_tokens", 3), ("top_logprobs", 2), ("logprobs", 2)):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > most:
            body[key] = most
    if "input" in body:  # a Responses body
        if body.get("max_output_tokens") is None:
            body["max_output_tokens"] = 2
    elif body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2  # null (or nothing) asks for everything up to the context
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:3]
    return body


def check_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["type"], r.text


def check_healthy(live) -> None:
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    deadline = time.time() + 20
    while (live.engine.requests or live.engine.block_manager.num_used_blocks) and time.time() < deadline:
        time.sleep(0.1)
    assert not live.engine.requests and live.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_hypothesis_bodies_never_get_a_5xx(live, path):
    @settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=DERANDOMIZE)
    @given(body=body_for(ENDPOINTS[path]) | st.binary(max_size=40), model=st.sampled_from([MODEL, None, "gpt-4"]))
    def one(body, model):
        if isinstance(body, bytes):
            content = body
        else:
            if model is not None:
                body.setdefault("model", model)
            content = json.dumps(clamp(body)).encode()
        check_answer(httpx.post(live.url + path, content=content, timeout=20,
                                headers=H | {"Content-Type": "application/json"}))

    one()
    check_healthy(live)


SCHEMA = schemathesis.openapi.from_dict(api_description())
OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in SCHEMA.get_all_operations())}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_schemathesis_cases_never_get_a_5xx(live, name):
    """Cases schemathesis draws from the published schema of each operation (valid and invalid bodies)."""

    @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=DERANDOMIZE)
    @given(case=OPERATIONS[name].as_strategy())
    def one(case):
        if isinstance(case.body, dict):
            clamp(case.body)
            if isinstance(case.body.get("model"), str):
                case.body["model"] = MODEL  # else nearly every case stops at the 404 for an unknown model
        response = case.call(base_url=live.url, headers=H, timeout=20)
        assert response.status_code < 500, (name, response.status_code, response.text[:500])
        if response.status_code < 400 and "json" in response.headers.get("content-type", ""):
            case.validate_response(response, checks=[schemathesis.checks.response_schema_conformance])

    one()
    check_healthy(live)
