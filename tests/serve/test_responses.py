"""The Responses API: the openai SDK's ``responses.create`` / ``stream`` / ``parse`` against a live server,
function calls and their outputs (stored with ``previous_response_id`` and sent back statelessly), the
event stream's shape, and the OpenAI Agents SDK's default (Responses) model running a two-tool loop."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest
from pydantic import BaseModel, Field

from loom.serve.responses import items_to_messages
from tests.serve.conftest import API_KEY, MODEL

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # the SDK would send traces to OpenAI

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                          "required": ["city"]}}


def test_a_plain_response(client):
    r = client.responses.create(model=MODEL, input="Name a color.", instructions="Answer in one word.",
                                temperature=0, max_output_tokens=16)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and r.output_text == item.content[0].text != ""
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.status in ("completed", "incomplete") and r.instructions == "Answer in one word."


def test_a_function_call_continued_by_id_and_by_items(client, live):
    first = client.responses.create(model=MODEL, input="What is the weather in Rome?", tools=[WEATHER],
                                    tool_choice="required", temperature=0, max_output_tokens=60)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 25 C"}
    by_id = client.responses.create(model=MODEL, previous_response_id=first.id, input=[result], tools=[WEATHER],
                                    temperature=0, max_output_tokens=20)
    by_items = client.responses.create(model=MODEL, tools=[WEATHER], temperature=0, max_output_tokens=20, input=[
        {"role": "user", "content": "What is the weather in Rome?"}, call.model_dump(exclude_none=True), result])
    assert by_id.usage.input_tokens == by_items.usage.input_tokens > first.usage.input_tokens
    # the same conversation (not compared by output: a prefix-cache hit computes the shared prompt's keys in
    # another batch shape, and greedy may break a near-tie the other way)
    store = live.app.state.loom.responses
    inputs = [store.get(r.id)[1][:-len(r.output)] for r in (by_id, by_items)]  # each without its own output
    assert items_to_messages(inputs[0]) == items_to_messages(inputs[1])
    assert by_id.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id


def test_the_stream_holds_the_events_in_order_and_ends_with_the_response(client):
    kwargs = dict(model=MODEL, input="What is the weather in Oslo?", tools=[WEATHER], tool_choice="required",
                  temperature=0, max_output_tokens=60)
    whole = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert "response.function_call_arguments.delta" in kinds
    assert [(c.name, c.arguments) for c in final.output] == [(c.name, c.arguments) for c in whole.output]
    # cut by max_output_tokens: the stream ends with response.incomplete, as OpenAI's does
    with client.responses.stream(model=MODEL, input="Say hello.", temperature=0, max_output_tokens=12) as stream:
        events = list(stream)
    texts = [event.delta for event in events if event.type == "response.output_text.delta"]
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
    assert "".join(texts) == last.response.output_text != ""


class Color(BaseModel):
    name: str = Field(max_length=20)
    hex: str = Field(pattern=r"^#[0-9a-f]{6}$")


def test_parse_with_a_pydantic_text_format(client):
    r = client.responses.parse(model=MODEL, input="Describe the color red.", text_format=Color, temperature=0,
                               max_output_tokens=60)
    assert isinstance(r.output_parsed, Color)


@pytest.mark.parametrize("body,words", [
    ({"input": "x", "previous_response_id": "resp_missing"}, "not found"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "function tools only"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "text parts only"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]}, "no earlier"),
    ({"input": "x", "background": True}, "background"),
    ({"input": []}, "at least one item"),
])
def test_what_cannot_be_served_is_400(live, body, words):
    r = httpx.post(live.url + "/v1/responses", json={"model": MODEL, "max_output_tokens": 4, **body},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_stored_responses_can_be_deleted(client):
    import openai

    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_items_become_chat_messages():
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    messages = items_to_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        call, {**call, "call_id": "c2"}, {"type": "reasoning", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "2"}]},
        {**call, "call_id": "c3"}])
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert messages[0]["content"] == "ab" and messages[1]["content"] == "Let me see."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"] and messages[3]["content"] == "2"
    assert messages[4]["content"] is None and messages[4]["tool_calls"][0]["id"] == "c3"


def test_the_agents_sdk_runs_a_two_tool_loop(live):
    """Two turns of an agent with two tools, each turn forcing one of them (a 135M model would not choose
    well by itself): the SDK calls the server's Responses API, runs the tool the model called with the
    model's arguments, sends its output back as a function_call_output item, and reads the final text; the
    second turn carries the whole first one (calls and outputs) as input items."""
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    ran: list[tuple[str, object]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current temperature in a city, in degrees celsius."""
        ran.append(("get_weather", city))
        return f"It is 21 degrees celsius in {city}."

    @function_tool
    def to_fahrenheit(celsius: float) -> str:
        """Convert a temperature from degrees celsius to fahrenheit."""
        ran.append(("to_fahrenheit", celsius))
        return f"{celsius * 9 / 5 + 32:.1f} degrees fahrenheit"

    def agent(client: AsyncOpenAI, tool: str) -> Agent:
        return Agent(name="weather", instructions="You answer questions about the weather with the tools.",
                     tools=[get_weather, to_fahrenheit], model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                     model_settings=ModelSettings(temperature=0, max_tokens=60, tool_choice=tool))

    async def conversation() -> tuple[object, object]:
        client = AsyncOpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        first = await Runner.run(agent(client, "get_weather"), "How warm is it in Paris?", max_turns=4)
        follow_up = first.to_input_list() + [{"role": "user", "content": "And in fahrenheit?"}]
        streamed = Runner.run_streamed(agent(client, "to_fahrenheit"), follow_up, max_turns=4)
        kinds = [event.type async for event in streamed.stream_events()]
        assert "run_item_stream_event" in kinds
        return first, streamed

    first, second = asyncio.run(conversation())
    assert [name for name, _ in ran] == ["get_weather", "to_fahrenheit"]
    assert isinstance(ran[1][1], float)
    assert isinstance(first.final_output, str) and isinstance(second.final_output, str)
    items = [item.type for item in first.new_items]
    assert items[:2] == ["tool_call_item", "tool_call_output_item"] and items[-1] == "message_output_item"
