"""An agent with two local tools, run by the OpenAI Agents SDK against `loom serve` (its default model
talks to the Responses API, which loom serves on its chat path).

    loom serve --port 8000 --api-key sk-local --served-model-name smollm2     # in one terminal
    python examples/agent.py --url http://127.0.0.1:8000/v1 --api-key sk-local

The default model (SmolLM2-135M) follows the call format only because loom's grammar forces it, and it
chooses tools poorly, so each turn here names the tool it must call (``--tool-choice auto`` lets the model
choose; a larger instruct model served with ``loom serve --model ...`` does that well). What the SDK does
is real either way: it sends the tools, runs the function the model called with the model's arguments,
sends the result back as a ``function_call_output`` item and reads the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # else the SDK exports traces to OpenAI

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402


@function_tool
def get_weather(city: str) -> str:
    """The current temperature in a city, in degrees celsius."""
    return f"It is 21 degrees celsius in {city}."


@function_tool
def to_fahrenheit(celsius: float) -> str:
    """Convert a temperature from degrees celsius to fahrenheit."""
    return f"{celsius * 9 / 5 + 32:.1f} degrees fahrenheit"


def weather_agent(client: AsyncOpenAI, model: str, tool_choice: str) -> Agent:
    return Agent(name="weather", instructions="You answer questions about the weather with the tools.",
                 tools=[get_weather, to_fahrenheit], model=OpenAIResponsesModel(model=model, openai_client=client),
                 model_settings=ModelSettings(temperature=0, max_tokens=80, tool_choice=tool_choice))


async def main(url: str, api_key: str, model: str, tool_choice: str | None) -> None:
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=url, api_key=api_key)
    first = await Runner.run(weather_agent(client, model, tool_choice or "get_weather"), "How warm is it in Paris?")
    for item in first.new_items:
        print(f"[{item.type}] {getattr(item, 'raw_item', '')!s:.160}")
    print("answer:", first.final_output)
    follow_up = first.to_input_list() + [{"role": "user", "content": "And in fahrenheit?"}]
    second = Runner.run_streamed(weather_agent(client, model, tool_choice or "to_fahrenheit"), follow_up)
    async for event in second.stream_events():
        if event.type == "run_item_stream_event":
            print(f"[{event.item.type}] {getattr(event.item, 'raw_item', '')!s:.160}")
    print("answer:", second.final_output)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("LOOM_API_KEY", "sk-local"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tool-choice", default=None, help="auto / required (default: name each turn's tool)")
    args = parser.parse_args()
    asyncio.run(main(args.url, args.api_key, args.model, args.tool_choice))
