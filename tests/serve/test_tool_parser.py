"""Reading tool calls out of text: whole, and streamed in any split, with the same result."""

from __future__ import annotations

import json
import random

import pytest

from loom.serve.tool_parser import ToolCallStream, json_value_end, parse
from loom.serve.tools import call_text

TWO_CALLS = (call_text("get_weather", {"city": "Paris", "note": "say \"hi\" {not a brace}"}) + "\n"
             + call_text("add", {"a": 1, "b": [2, {"c": "}"}]}))


def test_an_answer_is_content():
    assert parse("Paris is sunny.", final=True).content == "Paris is sunny."
    assert parse("  Hello <tool_call> later", final=True).content == "  Hello <tool_call> later"


def test_a_prefix_of_the_tag_is_held_back_until_the_end():
    assert parse("<tool_c").content is None and parse("<tool_c").calls == []
    assert parse("<tool_c", final=True).content == "<tool_c"
    assert parse("<b>bold</b>").content == "<b>bold</b>"


def test_calls_are_read_with_their_raw_arguments():
    parsed = parse(TWO_CALLS, final=True)
    assert parsed.content is None
    assert [c.name for c in parsed.calls] == ["get_weather", "add"]
    assert all(c.complete for c in parsed.calls)
    assert json.loads(parsed.calls[0].arguments) == {"city": "Paris", "note": 'say "hi" {not a brace}'}
    assert parsed.calls[1].arguments == '{"a": 1, "b": [2, {"c": "}"}]}'


def test_an_unfinished_call_has_the_arguments_so_far():
    text = call_text("add", {"a": 1, "b": 2})
    cut = text[:text.index('"b"')]
    (call,) = parse(cut).calls
    assert call.name == "add" and not call.complete and call.arguments == '{"a": 1, '
    assert parse(text[:text.index("add") + 2]).calls == []  # the name is not whole yet


@pytest.mark.parametrize("seed", range(20))
def test_streamed_in_any_split_the_fragments_join_into_the_whole(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TWO_CALLS)), rng.randint(1, 30)))
    pieces = [TWO_CALLS[a:b] for a, b in zip([0] + cuts, cuts + [len(TWO_CALLS)])]
    stream = ToolCallStream()
    deltas = [d for i, p in enumerate(pieces) for d in stream.feed(p, final=i == len(pieces) - 1)]
    assert all("content" not in d for d in deltas)
    names, arguments, ids = {}, {}, {}
    for d in deltas:
        (call,) = d["tool_calls"]
        k = call["index"]
        if "id" in call:
            assert k not in ids and call["type"] == "function" and call["function"]["arguments"] == ""
            ids[k], names[k] = call["id"], call["function"]["name"]
        else:
            assert k in ids  # the first fragment of a call comes first
        arguments[k] = arguments.get(k, "") + call["function"]["arguments"]
    whole = parse(TWO_CALLS, final=True).calls
    assert names == {0: "get_weather", 1: "add"} and len(set(ids.values())) == 2
    assert [arguments[0], arguments[1]] == [c.arguments for c in whole]
    assert stream.called


def test_a_streamed_answer_is_content_in_order():
    stream = ToolCallStream()
    out = [stream.feed(p) for p in ["<", "b>", "Hi", "</b>"]] + [stream.feed("", final=True)]
    assert "".join(d["content"] for ds in out for d in ds) == "<b>Hi</b>" and not stream.called


@pytest.mark.parametrize("text,end", [('{"a": "}"} tail', 10), ('"x\\"y" ', 6), ("12, ", 2), ("[1, [2]]", 8),
                                      ('{"a": 1', -1), ("12", -1)])
def test_json_value_end(text, end):
    assert json_value_end(text, 0) == end
