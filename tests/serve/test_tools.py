"""Tools: the generic prompt format, closed argument schemas, and the tool-call grammar, checked with
the real tokenizer (what each tool_choice allows) and the real model (every call it makes under the
grammar parses, names a given function and validates against that function's schema)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from loom.errors import InvalidRequestError
from loom.sampling_params import SamplingParams, StructuredOutput
from loom.serve.tool_parser import parse
from loom.serve.tools import (NamedToolChoice, Tool, call_text, check_tools, closed, generic_messages,
                              template_knows_tools, tool_grammar)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "The sum of two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
SEARCH = {"type": "function", "function": {  # pydantic-style: $defs and $ref inside the parameters
    "name": "search", "description": "Search the library",
    "parameters": {"$defs": {"Filter": {"type": "object", "properties": {
        "field": {"enum": ["author", "title"]}, "value": {"type": "string", "maxLength": 20}},
        "required": ["field", "value"]}},
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                         "filters": {"type": "array", "items": {"$ref": "#/$defs/Filter"},
                                                     "maxItems": 2},
                                         "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["query"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The current time"}}  # no parameters
TOOLS = [Tool.model_validate(t) for t in (WEATHER, ADD, SEARCH, NOW)]


def test_closed_adds_no_additional_properties_everywhere_it_is_unsaid():
    schema = closed(SEARCH["function"]["parameters"])
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Filter"]["additionalProperties"] is False
    assert closed({"type": "object", "properties": {}, "additionalProperties": True})["additionalProperties"] is True
    assert closed({"anyOf": [{"properties": {"x": {}}}]})["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in SEARCH["function"]["parameters"]  # a copy


def test_generic_messages_describe_the_tools_and_write_calls_and_results_back():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": '{"city": "Oslo", "unit": "celsius"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
                {"role": "tool", "tool_call_id": "c2", "content": "noon"}]
    out = generic_messages(messages, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == call_text("get_weather", {"city": "Oslo", "unit": "celsius"}) + call_text("now", {})
    assert out[3]["content"] == "<tool_response>\n-3 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
    assert generic_messages([{"role": "user", "content": "hi"}], TOOLS)[0]["role"] == "system"
    with pytest.raises(InvalidRequestError, match=r"messages\[2\].tool_calls\[0\].function.arguments is not JSON"):
        generic_messages([messages[0], messages[1], {**messages[2], "tool_calls": [
            {"id": "c", "function": {"name": "now", "arguments": "{oops"}}]}], TOOLS)


def test_template_knows_tools():
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_knows_tools("{% for m in messages %}{{ m.content }}{% endfor %}") and not template_knows_tools(None)


def test_bad_tool_sets_are_refused():
    with pytest.raises(InvalidRequestError, match="two tools are named 'add'"):
        check_tools([TOOLS[1], TOOLS[1]], "auto")
    with pytest.raises(InvalidRequestError, match="'mul', which is not among the tools"):
        check_tools(TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "mul"}}))
    with pytest.raises(InvalidRequestError, match="cannot be combined"):
        tool_grammar(TOOLS, "required", True, StructuredOutput(json_object=True))
    with pytest.raises(InvalidRequestError, match="only a JSON response_format"):
        tool_grammar(TOOLS, "auto", True, StructuredOutput(regex="a+"))
    assert tool_grammar(TOOLS, "none", True, None) is None


def accepts(backend, spec: StructuredOutput, text: str, tokenizer) -> bool:
    """Whether the grammar takes the whole of ``text`` and may end there."""
    m = backend.matcher(spec)
    return all(m.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and m.is_accepting()


def test_what_each_tool_choice_allows(smollm):
    backend, tok = smollm.engine.grammars, smollm.tokenizer
    weather = call_text("get_weather", {"city": "Paris", "unit": "celsius"})
    adds = call_text("add", {"a": 1, "b": 2}) + call_text("now", {})
    auto = tool_grammar(TOOLS, "auto", True)
    assert accepts(backend, auto, "It is sunny.", tok) and accepts(backend, auto, weather, tok)
    assert accepts(backend, auto, adds, tok)
    assert not accepts(backend, auto, "<tool_call>\nIt is sunny.", tok)
    assert not accepts(backend, auto, call_text("get_weather", {"city": "Paris"}), tok)  # "unit" is required
    assert not accepts(backend, auto, call_text("add", {"a": 1, "b": 2, "c": 3}), tok)  # closed
    assert not accepts(backend, auto, call_text("mul", {"a": 1}), tok)
    required = tool_grammar(TOOLS, "required", True)
    assert accepts(backend, required, adds, tok) and not accepts(backend, required, "It is sunny.", tok)
    single = tool_grammar(TOOLS, "required", False)
    assert accepts(backend, single, weather, tok) and not accepts(backend, single, adds, tok)
    named = tool_grammar(TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "add"}}), True)
    assert accepts(backend, named, call_text("add", {"a": 5, "b": 6}), tok)
    assert not accepts(backend, named, weather, tok) and not accepts(backend, named, adds, tok)
    answer = tool_grammar(TOOLS, "auto", True, StructuredOutput(json={"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}))
    assert accepts(backend, answer, '{"city": "Rome"}', tok) and accepts(backend, answer, weather, tok)
    assert not accepts(backend, answer, "It is sunny.", tok)


QUESTIONS = ["What is the weather in Paris in celsius?", "What is 17 plus 25?", "Find books by Tolkien.",
             "What time is it?", "Is it cold in Oslo?", "Add 3 and 4.", "Search for poems about the sea.",
             "Tell me a joke."]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_call_parses_and_validates_batched_with_free_requests(smollm, temperature):
    schemas = {t.function.name: t.function.schema for t in TOOLS}
    choices = ["required", "auto", NamedToolChoice.model_validate({"type": "function", "function": {"name": "search"}})]
    prompts, params, kinds = [], [], []
    for i, question in enumerate(QUESTIONS):
        messages = generic_messages([{"role": "user", "content": question}], TOOLS)
        for choice in choices:
            prompts.append(smollm.encode_chat(messages))
            params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=96,
                                         structured_output=tool_grammar(TOOLS, choice, True)))
            kinds.append(choice)
        prompts.append("Once upon a time")  # a free neighbour in the same batches
        params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=8, ignore_eos=True))
        kinds.append(None)
    calls = 0
    for out, kind in zip(smollm.generate(prompts, params), kinds):
        o = out.outputs[0]
        if kind is None:
            assert len(o.token_ids) == 8
            continue
        parsed = parse(o.text, final=True)
        if kind == "auto" and parsed.content is not None:  # a text answer (it may run to max_tokens)
            assert not o.text.lstrip().startswith("<tool_call>")
            continue
        # a run of calls may be cut by max_tokens: then only the last one is unfinished
        assert parsed.calls and all(c.complete for c in parsed.calls[:-1]), o.text
        assert parsed.calls[-1].complete == (o.finish_reason == "stop") or o.finish_reason == "length", o.text
        if isinstance(kind, NamedToolChoice):
            assert [c.name for c in parsed.calls] == ["search"]
        for c in parsed.calls:
            assert c.name in schemas
            if c.complete:
                jsonschema.validate(json.loads(c.arguments), schemas[c.name])
                calls += 1
    assert calls >= len(QUESTIONS)  # validated calls (a forced call cut by max_tokens is checked as far as it goes)


QWEN_LIKE = ("{% if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
             "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
             "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments}"
             " | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}")


def test_a_template_that_knows_tools_gets_them_with_arguments_as_values():
    from loom.serve.protocol import ChatCompletionRequest
    from loom.tokenizer.chat_template import render_chat

    req = ChatCompletionRequest.model_validate({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]})
    assert template_knows_tools(QWEN_LIKE)
    text = render_chat(QWEN_LIKE, req.chat_messages(True), **req.template_kwargs(True))
    assert '"name": "get_weather", "description"' in text  # the tool, described by the template itself
    assert '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in text  # a value, not a string
    assert "<|im_start|>tool\n-3 C" in text and "You can call functions" not in text  # no generic format
