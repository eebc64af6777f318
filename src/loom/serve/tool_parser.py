"""Reading tool calls out of generated text, whole or as it streams.

The text is either an answer or a run of calls in the wire format of ``loom.serve.tools``
(``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one after another). ``parse`` reads
what the text holds so far: the answer, and each call's name and the raw text of its arguments (possibly
unfinished). A whole response uses it once; a stream calls it after every delta and sends what is new
since the last parse (``ToolCallStream``), so the argument fragments a client joins are exactly the
arguments of the whole response: one parser for both.

The arguments' raw text is cut out of the call by scanning the JSON value (strings and escapes aware) that
follows ``"arguments":``, not re-serialized, so what the model wrote is what the client gets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from loom.serve.tools import CALL_OPEN, new_call_id

CALL_TAG = CALL_OPEN.rstrip("\n")  # "<tool_call>"
END_TAG = "</tool_call>"
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass
class ParsedCall:
    """One call as far as the text goes: its name (once whole), its arguments' text so far, and whether
    the call has ended (its arguments are a whole JSON value)."""

    name: str
    arguments: str
    complete: bool


@dataclass
class Parsed:
    """What a text holds: an answer (``content``; None once the text is calls) and the calls."""

    content: Optional[str]
    calls: list[ParsedCall]


def json_value_end(text: str, start: int) -> int:
    """The index just past the JSON value (object, array, string or scalar) that starts at ``start``, or
    -1 if the text ends first."""
    if start >= len(text):
        return -1
    first = text[start]
    if first == '"':
        i = start + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return i + 1
            i += 1
        return -1
    if first not in "{[":
        m = re.compile(r"-?[0-9.eE+\-]+|true|false|null").match(text, start)
        return m.end() if m and m.end() < len(text) else -1  # a scalar is whole once something follows it
    depth, i, in_string = 0, start, False
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _could_become(text: str, tag: str) -> bool:
    """Whether ``text`` (after stripping leading whitespace) is a proper prefix of ``tag``."""
    stripped = text.lstrip()
    return len(stripped) < len(tag) and tag.startswith(stripped)


def parse(text: str, final: bool = False) -> Parsed:
    """The answer and the calls in ``text``. Until ``final``, a text that may still turn into a call (a
    prefix of ``<tool_call>``) is held back as neither. Text that starts as an answer stays an answer."""
    stripped = text.lstrip()
    if not stripped.startswith(CALL_TAG):
        if not final and _could_become(text, CALL_TAG):
            return Parsed(None, [])
        return Parsed(text, [])
    calls: list[ParsedCall] = []
    pos = len(text) - len(stripped)
    while True:
        if not text.startswith(CALL_TAG, pos):
            break
        m = _NAME.match(text, pos + len(CALL_TAG))
        if m is None:
            break  # the name is not whole yet (or the call is malformed: nothing more to read)
        name = json.loads(m.group(1))
        end = json_value_end(text, m.end())
        if end < 0:
            calls.append(ParsedCall(name, text[m.end():], complete=False))
            break
        calls.append(ParsedCall(name, text[m.end():end], complete=True))
        close = text.find(END_TAG, end)
        if close < 0:
            break
        pos = close + len(END_TAG)
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
    return Parsed(None, calls)


def tool_calls_json(calls: list[ParsedCall], ids: list[str]) -> list[dict[str, Any]]:
    """OpenAI's ``message.tool_calls`` for parsed calls."""
    return [{"id": call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c, call_id in zip(calls, ids)]


@dataclass
class ToolCallStream:
    """One choice's text, turned into ``delta`` objects as it streams: ``content`` pieces for an answer;
    for calls, a first fragment per call (``index``, ``id``, ``type``, ``function.name``, empty
    ``arguments``) and then the arguments' new text."""

    text: str = ""
    content_sent: int = 0
    ids: list[str] = field(default_factory=list)
    arguments_sent: list[int] = field(default_factory=list)

    def feed(self, piece: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas that ``piece`` (the next text) makes known; ``final`` flushes what was held back."""
        self.text += piece
        parsed = parse(self.text, final)
        if parsed.content is not None:
            new = parsed.content[self.content_sent:]
            self.content_sent = len(parsed.content)
            return [{"content": new}] if new else []
        deltas = []
        for k, call in enumerate(parsed.calls):
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.arguments_sent.append(0)
                deltas.append({"tool_calls": [{"index": k, "id": self.ids[k], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            new = call.arguments[self.arguments_sent[k]:]
            if new:
                self.arguments_sent[k] = len(call.arguments)
                deltas.append({"tool_calls": [{"index": k, "function": {"arguments": new}}]})
        return deltas

    @property
    def called(self) -> bool:
        """Whether the text turned out to be calls."""
        return bool(self.ids)
