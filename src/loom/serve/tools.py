"""Tool calling for chat completions: the request's tools, how the model is told about them, and the
grammar that makes its calls well-formed.

The wire format of a call is the one Hermes-style models (NousResearch Hermes 2 Pro, Qwen 2.5) were
trained on, and the one this server parses::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls (``parallel_tool_calls``) follow one another directly (``...</tool_call><tool_call>...``). A chat template that
renders ``tools`` itself (its source mentions them) gets the tools, the assistant's earlier ``tool_calls``
and the ``tool`` messages as HF's ``apply_chat_template`` passes them; any other template gets the
*generic format*: the tool descriptions and the call format in the system prompt, earlier calls written
back into the assistant's text in the wire format, tool results as user turns wrapped in
``<tool_response>`` tags.

The output is constrained (``loom.engine.structured``) so that a call always parses and its arguments
follow the function's JSON schema: ``tool_choice: "required"`` allows only calls, a named function only
one call of it, ``"auto"`` either a text answer (one that does not start with ``<tool_call>``, or a JSON
value when ``response_format`` asks for one) or calls; ``"none"`` leaves the text free and parses nothing.
Each function's arguments are their own ``%json`` grammar, so a schema's ``$defs`` / ``$ref`` resolve
against the function's own parameters, as its author wrote them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from loom.engine.structured import JSON_LAYOUT
from loom.errors import InvalidRequestError
from loom.sampling_params import StructuredOutput

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
# Calls follow one another with nothing between: after "</tool_call>" the model chooses between the end of
# its turn and another call. With a newline there, small models took the newline (as after any line) and
# then repeated the call until max_tokens.
CALL_SEPARATOR = ""
FUNCTION_NAME = r"^[a-zA-Z0-9_.\-]{1,64}$"  # OpenAI's rule for function names (plus '.')
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, what it does, and its parameters' JSON schema."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None  # the arguments always follow the schema here, strict or not

    @property
    def schema(self) -> dict[str, Any]:
        """The arguments' JSON schema (no parameters: any JSON object), closed: an object that declares
        its properties takes no others unless it says so (``additionalProperties``), as OpenAI's strict
        mode requires of every schema. A function is called by a program; an argument it did not
        declare is one it cannot take."""
        return closed(self.parameters) if self.parameters else ANY_OBJECT


SUBSCHEMAS = ("items", "additionalItems", "contains", "not", "if", "then", "else")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")


def closed(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that lists ``properties``
    and says nothing about others (a copy; subschemas walked through the keywords that hold them)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in SUBSCHEMAS:
        if key in out:
            out[key] = closed(out[key])
    for key in SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    for key in SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


class Tool(BaseModel):
    """One entry of ``tools``."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call exactly this function."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


def new_call_id() -> str:
    """A fresh tool-call id, in OpenAI's ``call_`` form."""
    return f"call_{uuid.uuid4().hex[:24]}"


def check_tools(tools: list[Tool], choice: ToolChoice | None) -> None:
    """InvalidRequestError for duplicate function names or a named choice that is not among the tools."""
    names = [t.function.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidRequestError(f"two tools are named {duplicate!r}", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(f"tool_choice names the function {choice.function.name!r}, which is not "
                                  f"among the tools ({', '.join(names)})", param="tool_choice")


def template_knows_tools(template: str | None) -> bool:
    """Whether a chat template renders ``tools`` itself (HF's convention: a ``tools`` variable)."""
    return bool(template) and "tools" in template  # type: ignore[operator]


# The generic format ------------------------------------------------------------------------------


def tools_system_prompt(tools: list[Tool]) -> str:
    """The system-prompt text that describes ``tools`` and the call format (the generic format)."""
    described = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
    return ("You can call functions to help with the user's request. The functions, described as JSON "
            f"objects:\n<tools>\n{described}\n</tools>\n"
            "To call a function, answer with its name and arguments as a JSON object inside <tool_call></tool_call> "
            "tags, like this:\n"
            '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\n'
            "A function's result comes back inside <tool_response></tool_response> tags. When you need no function, "
            "answer in plain text.")


def call_text(name: str, arguments: Any) -> str:
    """One call in the wire format (``arguments`` as a JSON value)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def parse_arguments(text: str, where: str) -> Any:
    """The JSON value of an earlier call's ``arguments`` string (a 400 naming ``where`` if it is not JSON)."""
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{where}.function.arguments is not JSON: {e}", param="messages") from None


def generic_messages(messages: list[dict[str, Any]], tools: list[Tool] | None) -> list[dict[str, Any]]:
    """The messages in the generic format: tool descriptions added to the (first) system message, each
    assistant's ``tool_calls`` written into its text, consecutive tool results joined into one user turn."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], parse_arguments(c["function"]["arguments"],
                                                                      f"messages[{i}].tool_calls[{k}]"))
                     for k, c in enumerate(m["tool_calls"])]
            text = CALL_SEPARATOR.join(calls)
            if m.get("content"):
                text = f"{m['content']}\n{text}"
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = tools_system_prompt(tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as HF chat templates that know tools take them: each call's ``arguments`` a JSON value
    (templates write them with ``tojson``), the rest as sent."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"id": c["id"], "type": "function",
                      "function": {"name": c["function"]["name"],
                                   "arguments": parse_arguments(c["function"]["arguments"],
                                                                f"messages[{i}].tool_calls[{k}]")}}
                     for k, c in enumerate(m["tool_calls"])]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


# The constraint ----------------------------------------------------------------------------------


def _lark_literal(text: str) -> str:
    return json.dumps(text)


def _calls_rules(tools: list[Tool], parallel: bool) -> list[str]:
    """Lark rules for ``calls``: one call, or (``parallel``) one or more, of any of ``tools``."""
    alternatives, rules = [], []
    for k, tool in enumerate(tools):
        head = _lark_literal(f'{json.dumps(tool.function.name)}, "arguments": ')
        alternatives.append(f"{head} args_{k}")
        schema = {**tool.function.schema, "x-guidance": JSON_LAYOUT}
        rules.append(f"args_{k}: %json {json.dumps(schema)}")
    open_, close = _lark_literal(CALL_OPEN + '{"name": '), _lark_literal("}" + CALL_CLOSE)
    repeat = f" ({_lark_literal(CALL_SEPARATOR)} call)*" if parallel else ""
    return [f"calls: call{repeat}", f"call: {open_} function {close}",
            "function: " + " | ".join(alternatives)] + rules


# Free text that is not a call: anything but a text that starts with the call tag
TEXT_RULE = r"TEXT: /(?s:.+)/ & ~/(?s:<tool_call>.*)/"


def tool_grammar(tools: list[Tool], choice: ToolChoice | None, parallel: bool,
                 answer: StructuredOutput | None = None) -> StructuredOutput | None:
    """The constraint for a request with ``tools`` (None: ``tool_choice`` "none", the text is free).

    ``answer`` is the request's own constraint on a text answer (``response_format``): with "auto" the
    answer follows it; with "required" or a named function there is no text answer, so it is refused.
    """
    if choice == "none":
        return answer
    if isinstance(choice, NamedToolChoice):
        chosen = [t for t in tools if t.function.name == choice.function.name]
        start, rules = "start: calls", _calls_rules(chosen, parallel=False)
    elif choice == "required":
        start, rules = "start: calls", _calls_rules(tools, parallel)
    else:  # "auto" (the default when tools are given)
        if answer is None:
            start, rules = "start: TEXT | calls", _calls_rules(tools, parallel) + [TEXT_RULE]
        elif answer.json is not None or answer.json_object:
            schema = answer.json if answer.json is not None else ANY_OBJECT
            if isinstance(schema, str):
                schema = json.loads(schema)
            start = "start: answer | calls"
            rules = _calls_rules(tools, parallel) + [f"answer: %json {json.dumps({**schema, 'x-guidance': JSON_LAYOUT})}"]
        else:
            raise InvalidRequestError("with tools, only a JSON response_format can constrain the answer",
                                      param="response_format")
    if answer is not None and start == "start: calls":
        raise InvalidRequestError("a response_format cannot be combined with a tool_choice that forces a call",
                                  param="response_format")
    return StructuredOutput(grammar="\n".join([start] + rules))
