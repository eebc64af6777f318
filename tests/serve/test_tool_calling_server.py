"""Tool calling over HTTP with the openai SDK: calls in OpenAI's shape (whole and streamed through the
SDK's stream helpers), a tool round trip, pydantic function tools with ``parse``, and 400s for histories
and choices that cannot be served."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import API_KEY, MODEL
from tests.serve.test_tools import ADD, SEARCH, WEATHER

TOOLS = [WEATHER, ADD, SEARCH]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def test_a_required_call_comes_back_in_openai_shape(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in {"get_weather", "add", "search"}
    assert isinstance(json.loads(call.function.arguments), dict)


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2 plus 40?"}],
                                       tools=TOOLS, temperature=0, max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())


def test_streamed_calls_accumulate_in_the_sdk_to_the_whole_response(client, live):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    whole = client.chat.completions.create(**kwargs).choices[0]
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" == whole.finish_reason
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    # the raw events: the first fragment of a call has id, type and name; argument pieces follow
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**kwargs, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    fragments = [f for e in events for c in e["choices"] for f in c["delta"].get("tool_calls", [])]
    assert fragments[0]["id"].startswith("call_") and fragments[0]["type"] == "function"
    assert fragments[0]["function"] == {"name": whole.message.tool_calls[0].function.name, "arguments": ""}
    assert "".join(f["function"]["arguments"] for f in fragments if f["index"] == 0) == \
        whole.message.tool_calls[0].function.arguments
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=40)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


class Lookup(BaseModel):
    """Look a word up in the dictionary."""

    word: str = Field(max_length=20)
    language: str = Field(max_length=12)


def test_pydantic_function_tools_with_parse(client):
    done = client.chat.completions.parse(model=MODEL, temperature=0, max_tokens=60,
                                         tools=[openai.pydantic_function_tool(Lookup)], tool_choice="required",
                                         messages=[{"role": "user", "content": "What does 'chat' mean in French?"}])
    (call,) = done.choices[0].message.tool_calls
    assert call.function.name == "Lookup" and isinstance(call.function.parsed_arguments, Lookup)


@pytest.mark.parametrize("body,words", [
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}], "tools": TOOLS},
     "which no earlier assistant message made"),
    ({"messages": ASK + [{"role": "tool", "content": "1"}], "tools": TOOLS}, "tool_call_id"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "not among the tools"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"messages": ASK, "tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined"),
    ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array", "uniqueItems": True}}}], "tool_choice": "required"}, "uniqueItems"),
])
def test_what_cannot_be_served_is_400(live, body, words):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 8, **body},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
