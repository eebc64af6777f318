"""The clients people build agents with work unchanged against a live loom server: LangChain's ChatOpenAI
(structured output by JSON schema and by function calling, bound tools, a tool round trip, streamed tool
calls, the async path) and LiteLLM's ``completion`` (plain, streamed, structured, tool calls and their
round trip, async).

The model is tiny: what it says is not tested, only that each client's requests are accepted and that
what comes back has the shapes the client expects. Calls that must happen are forced (a named function,
``tool_choice`` "required" / LangChain's "any"), at temperature 0.

Nothing here may reach past this machine: LiteLLM is told to use its bundled model cost map (it fetches
one at import otherwise), LangSmith tracing is off, and an audit hook records every name lookup and
connection to a host that is not loopback; each test fails if there was one.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import API_KEY, MODEL

# Offline before the clients are imported: LiteLLM reads these at import (the cost map) and later.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

LOCAL_HOSTS = ("127.", "::1", "localhost", "0.0.0.0")
OUTSIDE: list[str] = []  # every lookup of, or connection to, a host that is not loopback, from here on


def _watch_network(event: str, args: tuple[Any, ...]) -> None:
    """Audit hook: record name lookups and connections to hosts that are not loopback."""
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect":
        address = args[1]
        host = address[0] if isinstance(address, tuple) else None  # a str is a unix socket
    else:
        return
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host is not None and not str(host).startswith(LOCAL_HOSTS):
        OUTSIDE.append(f"{event} {host!r}")


sys.addaudithook(_watch_network)

import litellm  # noqa: E402  (after the offline settings and the hook: its import once fetched a cost map)
import openai  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import BaseTool, tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from langsmith.run_helpers import tracing_context  # noqa: E402

AT_IMPORT = list(OUTSIDE)  # what importing the clients reached
litellm.suppress_debug_info = True  # no "Provider List" banners when it prices a stream it cannot price

pytestmark = [  # the clients' own noise, not loom's
    pytest.mark.filterwarnings("ignore:.*`ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def offline() -> Iterator[None]:
    """The clients' imports, and each test, reached no host but loopback; no LangSmith traces. (The hook
    stays for the session; only what happens while this module's tests run counts here.)"""
    assert not AT_IMPORT, f"importing the clients reached past this machine: {AT_IMPORT}"
    before = len(OUTSIDE)
    with tracing_context(enabled=False):
        yield
    assert not OUTSIDE[before:], f"a client reached past this machine: {OUTSIDE[before:]}"


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return json.dumps({"city": city, "temperature": 21, "sky": "clear"})


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS: dict[str, BaseTool] = {"get_weather": get_weather, "add": add}
ASK = "What is the weather in Paris?"


# LangChain ---------------------------------------------------------------------------------------


class Recorder:
    """The JSON bodies of the requests a client sent (an httpx event hook on the openai SDK's client)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: Any) -> None:
        self.bodies.append(json.loads(request.read()))

    @property
    def last(self) -> dict[str, Any]:
        """The body of the latest request."""
        return self.bodies[-1]


@pytest.fixture()
def sent() -> Recorder:
    """A fresh recorder of request bodies for each test."""
    return Recorder()


@pytest.fixture()
def chat(live, sent: Recorder) -> ChatOpenAI:
    """LangChain's ChatOpenAI pointed at the live server, recording what it sends."""
    return ChatOpenAI(base_url=live.url + "/v1", api_key=API_KEY, model=MODEL, temperature=0, max_tokens=60,
                      max_retries=0, timeout=60, stream_usage=True,
                      http_client=openai.DefaultHttpxClient(event_hooks={"request": [sent]}))


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_is_a_pydantic_instance(chat: ChatOpenAI, sent: Recorder, method: str) -> None:
    """``with_structured_output(Model)`` by both of its OpenAI methods returns an instance of the model:
    json_schema sends ``response_format`` with the model's schema, function_calling a tool named after the
    model with a ``tool_choice`` that forces it; loom accepts both and its answer parses."""
    city = chat.with_structured_output(City, method=method).invoke("Describe Paris.")
    assert isinstance(city, City)
    body = sent.last
    if method == "json_schema":
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["name"] == "City"
    else:
        assert [t["function"]["name"] for t in body["tools"]] == ["City"]
        assert body["tool_choice"] == {"type": "function", "function": {"name": "City"}}


def _check_call(message: AIMessage) -> dict[str, Any]:
    """``message``'s one tool call, in LangChain's shape, of one of TOOLS with arguments it takes."""
    assert isinstance(message, AIMessage) and not message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["type"] == "tool_call" and call["id"].startswith("call_") and call["name"] in TOOLS
    assert isinstance(call["args"], dict)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.response_metadata["model_name"] == MODEL
    return call


@pytest.mark.parametrize("choice", ["get_weather", "any"])
def test_langchain_tool_round_trip(chat: ChatOpenAI, sent: Recorder, choice: str) -> None:
    """``bind_tools`` with a forced call (a named tool, or "any", which LangChain sends as "required")
    gives a call the tool runs on; its ToolMessage appended, the next ``invoke`` is accepted: LangChain's
    history (the assistant's call with null content, the tool result with its tool_call_id) reaches loom
    and the answer is an AIMessage."""
    bound = chat.bind_tools(list(TOOLS.values()), tool_choice=choice, parallel_tool_calls=False)
    question = HumanMessage(ASK)
    first = bound.invoke([question])
    call = _check_call(first)
    expected_choice = "required" if choice == "any" else {"type": "function", "function": {"name": choice}}
    assert sent.last["tool_choice"] == expected_choice and sent.last["parallel_tool_calls"] is False
    if choice == "get_weather":
        assert call["name"] == "get_weather"
    result = TOOLS[call["name"]].invoke(call)  # a ToolMessage, as agents make it
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]

    second = chat.bind_tools(list(TOOLS.values())).invoke([question, first, result])
    assert isinstance(second, AIMessage) and (second.content or second.tool_calls)
    assert second.response_metadata["finish_reason"] in {"stop", "length", "tool_calls"}
    history = sent.last["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    (sent_call,) = history[1]["tool_calls"]
    assert sent_call["id"] == call["id"] and json.loads(sent_call["function"]["arguments"]) == call["args"]
    assert history[2]["tool_call_id"] == call["id"] and history[2]["content"] == result.content
    assert second.usage_metadata["input_tokens"] > first.usage_metadata["input_tokens"]  # the history was read


def test_langchain_streamed_tool_calls_equal_invoke(chat: ChatOpenAI) -> None:
    """``.stream`` of a bound call, its chunks summed, gives the tool calls ``.invoke`` gives (names and
    arguments; ids are fresh), with finish_reason tool_calls and the same usage; and the summed chunk
    goes back into the history as a streaming agent puts it there."""
    bound = chat.bind_tools(list(TOOLS.values()), tool_choice="get_weather")
    whole = bound.invoke(ASK)
    chunks = list(bound.stream(ASK))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    summed = chunks[0]
    for chunk in chunks[1:]:
        summed = summed + chunk
    assert not summed.invalid_tool_calls and summed.tool_calls
    assert [(c["name"], c["args"]) for c in summed.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]
    assert all(c["id"].startswith("call_") for c in summed.tool_calls)
    assert summed.response_metadata["finish_reason"] == "tool_calls"
    assert summed.usage_metadata["input_tokens"] == whole.usage_metadata["input_tokens"]
    assert summed.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]

    call = summed.tool_calls[0]
    after = chat.invoke([HumanMessage(ASK), summed, get_weather.invoke(call)])
    assert isinstance(after, AIMessage) and after.response_metadata["finish_reason"] in {"stop", "length"}


def test_langchain_history_with_parallel_calls(chat: ChatOpenAI, sent: Recorder) -> None:
    """A history in which one assistant turn made two calls, each answered by its own ToolMessage (as an
    agent writes it after parallel calls), is accepted as LangChain sends it."""
    calls = [{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_paris", "type": "tool_call"},
             {"name": "get_weather", "args": {"city": "Rome"}, "id": "call_rome", "type": "tool_call"}]
    history = [HumanMessage("Weather in Paris and in Rome?"), AIMessage(content="", tool_calls=calls)]
    history += [get_weather.invoke(c) for c in calls]
    answer = chat.bind_tools(list(TOOLS.values())).invoke(history)
    assert isinstance(answer, AIMessage) and answer.response_metadata["finish_reason"]
    roles = [m["role"] for m in sent.last["messages"]]
    assert roles == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in sent.last["messages"][1]["tool_calls"]] == ["call_paris", "call_rome"]


def test_langchain_async_path(chat: ChatOpenAI) -> None:
    """The async client (``ainvoke`` / ``astream``, on the SDK's AsyncOpenAI) gets the same structured
    output and tool calls as the sync one."""

    async def run() -> tuple[Any, AIMessage, AIMessageChunk]:
        city = await chat.with_structured_output(City, method="json_schema").ainvoke("Describe Paris.")
        bound = chat.bind_tools(list(TOOLS.values()), tool_choice="get_weather")
        whole = await bound.ainvoke(ASK)
        summed = None
        async for chunk in bound.astream(ASK):
            summed = chunk if summed is None else summed + chunk
        return city, whole, summed

    city, whole, summed = asyncio.run(run())
    assert isinstance(city, City)
    assert _check_call(whole)["name"] == "get_weather"
    assert [(c["name"], c["args"]) for c in summed.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]


# LiteLLM -----------------------------------------------------------------------------------------

FUNCTIONS = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                "parameters": t.tool_call_schema.model_json_schema()}}
             for t in TOOLS.values()]


@pytest.fixture()
def via_litellm(live) -> dict[str, Any]:
    """The arguments that point ``litellm.completion`` at the live server as an OpenAI-compatible one."""
    return {"model": f"openai/{MODEL}", "api_base": live.url + "/v1", "api_key": API_KEY, "temperature": 0,
            "timeout": 60, "num_retries": 0}


def test_litellm_plain_completion(via_litellm: dict[str, Any]) -> None:
    """A plain completion comes back as LiteLLM's ModelResponse: an assistant message with text, a
    finish_reason, the usage, loom's id and the served model's name."""
    r = litellm.completion(messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, **via_litellm)
    assert isinstance(r, litellm.ModelResponse)
    assert r.id.startswith("chatcmpl-") and r.model == MODEL and r.object == "chat.completion"
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert not choice.message.tool_calls and choice.finish_reason in {"stop", "length"}
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_litellm_streaming(via_litellm: dict[str, Any]) -> None:
    """``stream=True`` yields ModelResponseStream chunks whose content deltas join to the whole answer,
    the finish_reason on the last choice, and (``include_usage``) a usage chunk that
    ``stream_chunk_builder`` turns back into the whole response's usage."""
    messages = [{"role": "user", "content": "Say hello."}]
    whole = litellm.completion(messages=messages, max_tokens=16, **via_litellm)
    chunks = list(litellm.completion(messages=messages, max_tokens=16, stream=True,
                                     stream_options={"include_usage": True}, **via_litellm))
    assert len(chunks) > 2 and all(isinstance(c, litellm.ModelResponseStream) for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    built = litellm.stream_chunk_builder(chunks, messages=messages)
    assert built.choices[0].message.content == whole.choices[0].message.content
    assert (built.usage.prompt_tokens, built.usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_litellm_structured_output(via_litellm: dict[str, Any]) -> None:
    """``response_format`` as a pydantic model (LiteLLM sends it as a strict json_schema) is enforced: the
    content validates as the model."""
    r = litellm.completion(messages=[{"role": "user", "content": "Describe Paris."}], response_format=City,
                           max_tokens=60, **via_litellm)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(City.model_validate_json(r.choices[0].message.content), City)


def test_litellm_tool_call_and_round_trip(via_litellm: dict[str, Any]) -> None:
    """``tools`` with ``tool_choice`` "required" give a call in LiteLLM's shape (ChatCompletionMessageToolCall,
    JSON arguments, finish_reason tool_calls); streamed, the delta fragments build the same call; and the
    message with its tool result appended is accepted as the next request's history."""
    messages: list[Any] = [{"role": "user", "content": ASK}]
    kwargs = dict(tools=FUNCTIONS, tool_choice="required", parallel_tool_calls=False, max_tokens=60, **via_litellm)
    r = litellm.completion(messages=messages, **kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in TOOLS
    args = json.loads(call.function.arguments)
    TOOLS[call.function.name].tool_call_schema.model_validate(args)

    chunks = list(litellm.completion(messages=messages, stream=True, **kwargs))
    fragments = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or []]
    assert fragments[0].id.startswith("call_") and fragments[0].function.name == call.function.name
    assert "".join(f.function.arguments or "" for f in fragments) == call.function.arguments
    built = litellm.stream_chunk_builder(chunks, messages=messages)
    assert built.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in built.choices[0].message.tool_calls] == \
        [(call.function.name, call.function.arguments)]

    history = messages + [choice.message, {"role": "tool", "tool_call_id": call.id,
                                           "content": str(TOOLS[call.function.name].invoke(args))}]
    second = litellm.completion(messages=history, tools=FUNCTIONS, max_tokens=30, **via_litellm)
    assert second.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert second.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result were read


def test_litellm_async_tool_call(via_litellm: dict[str, Any]) -> None:
    """``litellm.acompletion`` (its async transport), whole and streamed, gets a named function's call."""
    named = {"type": "function", "function": {"name": "add"}}
    messages = [{"role": "user", "content": "What is 2 plus 40?"}]

    async def run() -> tuple[Any, list[Any]]:
        whole = await litellm.acompletion(messages=messages, tools=FUNCTIONS, tool_choice=named, max_tokens=40,
                                          **via_litellm)
        stream = await litellm.acompletion(messages=messages, tools=FUNCTIONS, tool_choice=named, max_tokens=40,
                                           stream=True, **via_litellm)
        return whole, [c async for c in stream]

    whole, chunks = asyncio.run(run())
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    built = litellm.stream_chunk_builder(chunks, messages=messages)
    assert [(c.function.name, c.function.arguments) for c in built.choices[0].message.tool_calls] == \
        [(call.function.name, call.function.arguments)]
