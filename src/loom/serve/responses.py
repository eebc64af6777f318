"""OpenAI's Responses API (``POST /v1/responses``), served through the chat path.

A Responses request is a conversation as *items* (messages, the model's ``function_call`` items, the
caller's ``function_call_output`` items), ``instructions``, function ``tools`` and a ``text.format``. It is
translated into the chat request it means (``ChatCompletionRequest``: instructions as the system message,
calls as an assistant's ``tool_calls``, outputs as ``tool`` messages, ``text.format`` as
``response_format``), so the chat template, the tool grammar, the structured outputs and every check are
the chat path's own. The answer comes back as ``output`` items: a ``message`` with ``output_text``, or
``function_call`` items; streamed, as the typed events (``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ``response.function_call_arguments.delta``, ... ``response.completed``).

Stateless, except for ``previous_response_id``: a response stored (``store``, true by default) keeps its
whole conversation (input and output items, not its instructions, as OpenAI does) in an in-memory LRU of
bounded size (``response_store.py``, on the ServerState); a request that names it continues that conversation. ``GET`` / ``DELETE
/v1/responses/{id}`` read and drop stored responses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loom.errors import InvalidRequestError, NotFoundError
from loom.outputs import CompletionOutput
from loom.serve import openapi as doc
from loom.serve.body import validate
from loom.serve.protocol import ChatCompletionRequest, check_limits
from loom.serve.routes import chat_prompt
from loom.serve.state import ServerState, authorize, server_state
from loom.serve.submit import collect, deltas, submit, until_disconnect
from loom.serve.tool_parser import ToolCallStream, parse
from loom.serve.tools import new_call_id

Json = dict[str, Any]
# Sampling extras a Responses body may carry, passed on to the chat request as they are
EXTRAS = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
          "logit_bias", "ignore_eos", "min_tokens", "stop_token_ids")


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses``. Fields that only change OpenAI's bookkeeping (``include``,
    ``reasoning``, ``truncation``, ``service_tier``, prompt caching) are accepted and ignored without a
    warning, since the Agents SDK sends them on every call; the sampling extras of the chat path (``seed``,
    ``top_k``, ``min_p``, ...) are passed on to it."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    max_output_tokens: Optional[int] = Field(None, ge=1)
    stream: bool = False
    text: Optional[dict[str, Any]] = None
    previous_response_id: Optional[str] = None
    store: Optional[bool] = True
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    background: Optional[bool] = None
    conversation: Optional[Any] = None
    # accepted, not used
    include: Optional[list[str]] = None
    reasoning: Optional[dict[str, Any]] = None
    truncation: Optional[str] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    prompt_cache_retention: Optional[str] = None
    top_logprobs: Optional[int] = None
    stream_options: Optional[dict[str, Any]] = None
    # the chat path's sampling extras (checked there)
    seed: Optional[Any] = None
    top_k: Optional[Any] = None
    min_p: Optional[Any] = None
    repetition_penalty: Optional[Any] = None
    presence_penalty: Optional[Any] = None
    frequency_penalty: Optional[Any] = None
    stop: Optional[Any] = None
    logit_bias: Optional[Any] = None
    ignore_eos: Optional[Any] = None
    min_tokens: Optional[Any] = None
    stop_token_ids: Optional[Any] = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.background:
            raise ValueError("background responses are not supported (the answer comes in the request)")
        if self.conversation is not None:
            raise ValueError("conversations are not stored here; continue one with previous_response_id")
        return self


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# Items -> chat messages ----------------------------------------------------------------------------


def content_text(content: Any, where: str) -> str:
    """The text of an item's ``content``: a string, or text parts (``input_text``, ``output_text``,
    ``refusal``); anything else (images, files, audio) is a 400."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", param="input")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise InvalidRequestError(f"{where}.content[{k}] is of type {kind!r}; this server takes text parts only",
                                      param="input")
    return "".join(texts)


def items_to_messages(items: list[Json]) -> list[Json]:
    """The chat messages a list of input items means. Consecutive ``function_call`` items join the
    assistant message before them (or a new one) as its ``tool_calls``; ``reasoning`` items are dropped."""
    messages: list[Json] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{where} must be an object", param="input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"{where}.role must be user, assistant, system or developer", param="input")
            messages.append({"role": role, "content": content_text(item.get("content"), where)})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise InvalidRequestError(f"{where} (a function_call) needs a string {key!r}", param="input")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequestError(f"{where} (a function_call_output) needs a string 'call_id'", param="input")
            output = item.get("output")
            text = output if isinstance(output, str) else content_text(output, where)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            continue
        else:
            raise InvalidRequestError(f"{where} is of type {kind!r}; this server takes message, function_call and "
                                      "function_call_output items", param="input")
    return messages


def chat_tools(tools: list[Json]) -> list[Json]:
    """Responses function tools (flat: ``name``, ``parameters`` at the top) as chat tools."""
    out = []
    for k, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(f"tools[{k}] is of type {tool.get('type')!r}; this server runs function tools "
                                      "only (hosted tools such as web_search are OpenAI's)", param="tools")
        fields = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
        out.append({"type": "function", "function": fields})
    return out


def chat_tool_choice(choice: Union[str, Json, None]) -> Union[str, Json, None]:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise InvalidRequestError("tool_choice must be none, auto, required or {\"type\": \"function\", "
                                      "\"name\": ...}", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def chat_response_format(text: Optional[Json]) -> Optional[Json]:
    """``text.format`` as a chat ``response_format`` (flat json_schema fields nested as chat nests them)."""
    fmt = (text or {}).get("format")
    if not fmt:
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), "schema": fmt.get("schema"),
                                                        "strict": fmt.get("strict")}}
    return {"type": fmt.get("type")}


def chat_request(req: ResponsesRequest, history: list[Json]) -> ChatCompletionRequest:
    """The chat request that ``req`` (after the stored ``history`` items) means."""
    items = history + ([{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input)
    messages = items_to_messages(items)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    if not messages:
        raise InvalidRequestError("input must hold at least one item", param="input")
    body: Json = {"messages": messages, "temperature": req.temperature, "top_p": req.top_p,
                  "max_completion_tokens": req.max_output_tokens, "user": req.user,
                  "parallel_tool_calls": req.parallel_tool_calls,
                  "response_format": chat_response_format(req.text)}
    if req.tools:
        body["tools"] = chat_tools(req.tools)
        body["tool_choice"] = chat_tool_choice(req.tool_choice)
    body |= {k: getattr(req, k) for k in EXTRAS}
    return validate(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None})


# Output -> items -----------------------------------------------------------------------------------


def message_item(text: str, item_id: str, status: str = "completed") -> Json:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> Json:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def output_items(out: CompletionOutput, calls_tools: bool) -> list[Json]:
    """The ``output`` of a finished completion: its calls, or one message."""
    if calls_tools:
        parsed = parse(out.text, final=True)
        if parsed.calls:
            return [call_item(new_id("fc"), new_call_id(), c.name, c.arguments) for c in parsed.calls]
    return [message_item(out.text, new_id("msg"))]


@dataclass
class ResponseShell:
    """What a response object repeats from its request, and its id and time."""

    id: str
    created_at: int
    model: str
    req: ResponsesRequest

    def object(self, status: str, output: list[Json], usage: Optional[Json] = None,
               finish_reason: Optional[str] = None) -> Json:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": "incomplete" if incomplete else status, "error": None, "incomplete_details": incomplete,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
                "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": req.store is not False, "temperature": 1.0 if req.temperature is None else req.temperature,
                "text": req.text or {"format": {"type": "text"}}, "tool_choice": req.tool_choice or "auto",
                "tools": req.tools or [], "top_p": 1.0 if req.top_p is None else req.top_p, "truncation": "disabled",
                "usage": usage, "user": req.user, "metadata": req.metadata or {}}


def response_usage(prompt_tokens: int, output_tokens: int) -> Json:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


# The store -----------------------------------------------------------------------------------------


def history_of(state: ServerState, req: ResponsesRequest) -> list[Json]:
    """The conversation items ``previous_response_id`` continues (none without one)."""
    if req.previous_response_id is None:
        return []
    try:
        return list(state.responses.get(req.previous_response_id)[1])
    except NotFoundError:
        raise InvalidRequestError(f"previous response {req.previous_response_id!r} not found (responses are kept "
                                  f"in memory, the last {state.responses.size})", param="previous_response_id") from None


def new_items(req: ResponsesRequest) -> list[Json]:
    return [{"role": "user", "content": req.input}] if isinstance(req.input, str) else list(req.input)


# Streaming -----------------------------------------------------------------------------------------


class ResponseEvents:
    """Turns one completion's deltas into the Responses stream events, and remembers the output items."""

    def __init__(self, shell: ResponseShell, calls_tools: bool) -> None:
        self.shell = shell
        self.reader = ToolCallStream() if calls_tools else None
        self.sequence = 0
        self.items: list[Json] = []
        self.text = ""
        self._open: Optional[Json] = None  # the item receiving deltas

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def start(self) -> list[str]:
        shell = self.shell.object("in_progress", [])
        return [self.event("response.created", response=shell), self.event("response.in_progress", response=shell)]

    def _close(self) -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.items) - 1
        if item["type"] == "message":
            part = item["content"][0]
            events = [self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                                 text=part["text"], logprobs=[]),
                      self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                 content_index=0, part=part)]
        else:
            events = [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=item["name"], arguments=item["arguments"])]
        item["status"] = "completed"
        return events + [self.event("response.output_item.done", output_index=index, item=item)]

    def _open_item(self, item: Json) -> list[str]:
        self.items.append(item)
        self._open = item
        index = len(self.items) - 1
        events = [self.event("response.output_item.added", output_index=index, item=json.loads(json.dumps(item)))]
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                            "logprobs": []}))
        return events

    def feed(self, text: str, final: bool) -> list[str]:
        """The events for the next piece of text (``final``: the completion has ended)."""
        pieces = self.reader.feed(text, final) if self.reader is not None else ([{"content": text}] if text else [])
        events: list[str] = []
        for piece in pieces:
            if "content" in piece:
                if self._open is None or self._open["type"] != "message":
                    events += self._close() + self._open_item(message_item("", new_id("msg"), "in_progress"))
                self._open["content"][0]["text"] += piece["content"]  # type: ignore[index]
                events.append(self.event("response.output_text.delta", item_id=self._open["id"],  # type: ignore[index]
                                         output_index=len(self.items) - 1, content_index=0, delta=piece["content"],
                                         logprobs=[]))
            for fragment in piece.get("tool_calls", []):
                if "id" in fragment:
                    events += self._close() + self._open_item(call_item(
                        new_id("fc"), fragment["id"], fragment["function"]["name"], "", "in_progress"))
                arguments = fragment["function"]["arguments"]
                if arguments:
                    self._open["arguments"] += arguments  # type: ignore[index]
                    events.append(self.event("response.function_call_arguments.delta", item_id=self._open["id"],  # type: ignore[index]
                                             output_index=len(self.items) - 1, delta=arguments))
        if final:
            if not self.items:  # an empty answer is still a message
                events += self._open_item(message_item("", new_id("msg"), "in_progress"))
            events += self._close()
        return events


# Routes --------------------------------------------------------------------------------------------

router = APIRouter(dependencies=[Depends(authorize)], responses=doc.KEYED)


def response_body_doc() -> Json:
    return doc.body(ResponsesRequest)


@router.post("/v1/responses", openapi_extra=response_body_doc(),
             responses={200: {"description": "A response object, or (stream) its server-sent events",
                              "content": {"application/json": {"schema": {"type": "object"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}}} | doc.BODY_ERRORS)
async def create_response(request: Request, state: ServerState = Depends(server_state)) -> Response:
    """OpenAI's Responses API on the chat path: input items, instructions, function tools and their
    outputs, ``text.format``, streaming events, ``previous_response_id``."""
    req = await state.read(request, ResponsesRequest)
    lora = state.check_model(req.model)
    history = history_of(state, req)
    chat = chat_request(req, history)
    check_limits(chat, state.limits)
    ids = chat_prompt(state, chat)
    params = chat.sampling_params(chat.max_new_tokens, vocab_size=state.vocab_size)
    shell = ResponseShell(new_id("resp"), int(time.time()), state.response_model(lora), req)
    sub = await submit(state.async_engine, [ids], params, shell.id, lora)
    conversation = history + new_items(req)
    if req.stream:
        return StreamingResponse(stream_events(state, shell, sub, chat.calls_tools, conversation),
                                 media_type="text/event-stream")
    (output,) = await until_disconnect(request, collect(sub))
    out = output.outputs[0]
    response = shell.object("completed", output_items(out, chat.calls_tools),
                            response_usage(len(output.prompt_token_ids), len(out.token_ids)), out.finish_reason)
    if req.store is not False:
        state.responses.put(response, conversation + response["output"])
    return JSONResponse(response)


async def stream_events(state: ServerState, shell: ResponseShell, sub: Any, calls_tools: bool,
                        conversation: list[Json]) -> AsyncIterator[str]:
    events = ResponseEvents(shell, calls_tools)
    for e in events.start():
        yield e
    generated, finish = 0, None
    try:
        async for _, d in deltas(sub):
            generated += len(d.token_ids)
            finish = d.finish_reason or finish
            for e in events.feed(d.text, final=d.finish_reason is not None):
                yield e
    except Exception as error:  # noqa: BLE001 - the stream is open: end it with an error event
        response = shell.object("failed", events.items)
        response["error"] = {"code": "server_error", "message": str(error)}
        yield events.event("response.failed", response=response)
        return
    usage = response_usage(len(sub.requests[0].prompt_ids), generated)
    response = shell.object("completed", events.items, usage, finish)
    if shell.req.store is not False:
        state.responses.put(response, conversation + response["output"])
    kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
    yield events.event(kind, response=response)


@router.get("/v1/responses/{response_id}", response_model=dict[str, Any], responses=doc.errors(404))
async def get_response(response_id: str, state: ServerState = Depends(server_state)) -> Json:
    """A stored response."""
    return state.responses.get(response_id)[0]


@router.delete("/v1/responses/{response_id}", response_model=dict[str, Any], responses=doc.errors(404))
async def delete_response(response_id: str, state: ServerState = Depends(server_state)) -> Json:
    """Drop a stored response."""
    state.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}
