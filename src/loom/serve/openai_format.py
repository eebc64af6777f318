"""loom's outputs as OpenAI's JSON objects: completions, chat completions, their stream chunks, SSE.

Pure functions (and one stream formatter that keeps per-choice state): no HTTP, no engine. They take
what generation returns (``RequestOutput``, ``StreamDelta``, per-token ``PositionLogprobs``) and build
the objects OpenAI's API reference specifies:

* ``text_completion`` (``/v1/completions``), whole or as chunks, with the legacy ``logprobs`` object
  (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and ``echo``;
* ``chat.completion`` and ``chat.completion.chunk`` (``/v1/chat/completions``), with the chat
  ``logprobs`` object (``content``: token, logprob, UTF-8 bytes, top alternatives);
* ``usage`` and the ``model`` / ``list`` objects of ``/v1/models``;
* server-sent events: ``data: <json>`` lines and the closing ``data: [DONE]``.

A token's text is the ``decoded_token`` the engine stored with its logprob (the tokenizer's decoding of
that token alone); the echoed prompt's text comes from a ``decode`` callable the caller passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from loom.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput, StreamDelta
from loom.serve.tool_parser import ToolCallStream, parse, tool_calls_json
from loom.serve.tools import new_call_id

Json = dict[str, Any]
Decode = Callable[[Sequence[int]], str]  # token ids -> text (the tokenizer's decode)

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: Json) -> str:
    """One server-sent event carrying ``payload`` as compact JSON (non-ASCII text kept as is)."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class Envelope:
    """What every object of one response shares: its id, creation time (Unix seconds) and model name."""

    id: str
    created: int
    model: str

    def wrap(self, object_type: str, choices: list[Json], **extra: Any) -> Json:
        """``{"id", "object", "created", "model", "choices", **extra}`` in OpenAI's key order."""
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model,
                "choices": choices, **extra}


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    """OpenAI's ``usage`` object; ``total_tokens`` is the sum of the two."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model: str, created: int, max_model_len: int, root: Optional[str] = None,
               parent: Optional[str] = None) -> Json:
    """The ``model`` object of ``/v1/models`` (plus ``max_model_len``, as other engines report it). Given a
    ``root`` (the weights' folder or file), also vLLM's ``root`` and ``parent``: a LoRA adapter's parent is
    the base model's name, the base model's is null."""
    card = {"id": model, "object": "model", "created": created, "owned_by": "loom", "max_model_len": max_model_len}
    if root is not None:
        card |= {"root": root, "parent": parent}
    return card


def model_list(cards: list[Json]) -> Json:
    """The ``list`` object of ``GET /v1/models``."""
    return {"object": "list", "data": cards}


def _by_rank(entry: PositionLogprobs) -> list[tuple[int, Logprob]]:
    """A position's alternatives, most likely first."""
    return sorted(entry.items(), key=lambda kv: kv[1].rank)


# Completions -----------------------------------------------------------------------------------


def empty_completion_logprobs() -> Json:
    """The legacy completions ``logprobs`` object with no tokens yet."""
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def extend_completion_logprobs(into: Json, more: Json) -> Json:
    """Append ``more``'s four lists to ``into``'s (in place); returns ``into``."""
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        into[key] += more[key]
    return into


def completion_logprobs(token_ids: Sequence[int], entries: Optional[Sequence[PositionLogprobs]],
                        offset: int = 0) -> Json:
    """The legacy ``logprobs`` object for generated tokens: each token's text, its logprob, its top
    alternatives ``{text: logprob}`` (most likely first), and its character offset, counted from
    ``offset``. Tokens without an entry (logprobs not asked for) are left out."""
    lp = empty_completion_logprobs()
    for t, entry in zip(token_ids, entries or []):
        chosen = entry[t]
        lp["tokens"].append(chosen.decoded_token)
        lp["token_logprobs"].append(chosen.logprob)
        lp["top_logprobs"].append({alt.decoded_token: alt.logprob for _, alt in _by_rank(entry)})
        lp["text_offset"].append(offset)
        offset += len(chosen.decoded_token)
    return lp


def echo_part(prompt_ids: Sequence[int], prompt_logprobs: Optional[Sequence[Optional[PositionLogprobs]]],
              decode: Decode) -> tuple[str, Json]:
    """The echoed prompt: its text, and (when ``prompt_logprobs`` were computed) the logprobs object of
    its tokens, whose first entries are ``null`` (nothing predicts the first token)."""
    text = decode(prompt_ids)
    lp = empty_completion_logprobs()
    if prompt_logprobs is None:
        return text, lp
    offset = 0
    for pos, t in enumerate(prompt_ids):
        piece = decode([t])
        lp["tokens"].append(piece)
        lp["text_offset"].append(offset)
        offset += len(piece)
        entry = prompt_logprobs[pos] if pos < len(prompt_logprobs) else None
        if entry is None:
            lp["token_logprobs"].append(None)
            lp["top_logprobs"].append(None)
        else:
            lp["token_logprobs"].append(entry[t].logprob)
            lp["top_logprobs"].append({alt.decoded_token: alt.logprob for _, alt in _by_rank(entry)})
    return text, lp


def completion_response(env: Envelope, outputs: Sequence[RequestOutput], decode: Decode, *, echo: bool = False,
                        echo_only: bool = False, logprobs: bool = False) -> Json:
    """The ``text_completion`` object for finished requests, one per prompt (choice ``i * n + k`` is
    completion ``k`` of prompt ``i``). ``echo`` puts the prompt before each choice's text; ``echo_only``
    (``max_tokens`` 0) answers the prompt alone, with finish reason ``length`` and no completion
    tokens; ``logprobs`` includes the legacy logprobs object (else ``null``)."""
    choices, generated = [], 0
    for i, request in enumerate(outputs):
        n = len(request.outputs)
        for out in request.outputs:
            text, lp = "", empty_completion_logprobs()
            if echo:
                text, lp = echo_part(request.prompt_token_ids, request.prompt_logprobs, decode)
            finish = out.finish_reason
            if echo_only:
                finish = "length"
            else:
                generated += len(out.token_ids)
                extend_completion_logprobs(lp, completion_logprobs(out.token_ids, out.logprobs, len(text)))
                text += out.text
            choices.append({"index": i * n + out.index, "text": text, "logprobs": lp if logprobs else None,
                            "finish_reason": finish})
    prompt_tokens = sum(len(r.prompt_token_ids) for r in outputs)
    return env.wrap("text_completion", choices, usage=usage(prompt_tokens, generated))


@dataclass
class CompletionStream:
    """Turns the deltas of one streamed completions request into its ``text_completion`` chunks.

    ``prompts`` are the token ids of each prompt, ``n`` the completions per prompt; ``echo``,
    ``echo_only`` and ``logprobs`` mean what they mean for ``completion_response``. Each choice's
    first chunk carries the echoed prompt; text offsets continue across a choice's chunks.
    """

    env: Envelope
    prompts: list[list[int]]
    n: int
    decode: Decode
    echo: bool = False
    echo_only: bool = False
    logprobs: bool = False
    generated: int = 0
    _offsets: dict[int, int] = field(default_factory=dict)  # choice -> characters sent so far
    _echoed: set[int] = field(default_factory=set)
    _firsts: dict[int, StreamDelta] = field(default_factory=dict)  # prompt -> the delta with its prompt logprobs

    def chunk(self, prompt_index: int, d: StreamDelta) -> Json:
        """The chunk for delta ``d`` of prompt ``prompt_index`` (every delta gets one, even an empty one)."""
        choice = prompt_index * self.n + d.index
        if d.prompt_token_ids is not None:
            self._firsts[prompt_index] = d
        text, lp = "", empty_completion_logprobs()
        if self.echo and choice not in self._echoed:
            self._echoed.add(choice)
            first = self._firsts.get(prompt_index, d)
            text, lp = echo_part(self.prompts[prompt_index], first.prompt_logprobs, self.decode)
            self._offsets[choice] = len(text)
        if not self.echo_only:
            self.generated += len(d.token_ids)
            offset = self._offsets.get(choice, 0)
            extend_completion_logprobs(lp, completion_logprobs(d.token_ids, d.logprobs, offset))
            text += d.text
            self._offsets[choice] = offset + len(d.text)
        finish = "length" if self.echo_only and d.finish_reason is not None else d.finish_reason
        return self.env.wrap("text_completion", [{"index": choice, "text": text,
                                                  "logprobs": lp if self.logprobs else None,
                                                  "finish_reason": finish}])

    def usage_chunk(self) -> Json:
        """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage so far."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        return self.env.wrap("text_completion", [], usage=usage(prompt_tokens, self.generated))


# Chat completions ------------------------------------------------------------------------------


def chat_logprobs(token_ids: Sequence[int], entries: Optional[Sequence[PositionLogprobs]], top_n: int) -> Json:
    """The chat ``logprobs`` object: for each token its text, logprob and UTF-8 bytes, and its ``top_n``
    most likely alternatives (the same fields each)."""
    content = []
    for t, entry in zip(token_ids, entries or []):
        chosen = entry[t]
        content.append({"token": chosen.decoded_token, "logprob": chosen.logprob,
                        "bytes": list(chosen.decoded_token.encode("utf-8")),
                        "top_logprobs": [{"token": alt.decoded_token, "logprob": alt.logprob,
                                          "bytes": list(alt.decoded_token.encode("utf-8"))}
                                         for _, alt in _by_rank(entry)[:top_n]]})
    return {"content": content}


def assistant_message(out: CompletionOutput, calls_tools: bool = False) -> tuple[Json, Optional[str]]:
    """The assistant message of a finished completion and its finish reason. With ``calls_tools``, text
    that is tool calls becomes ``tool_calls`` (``content`` null) and the finish reason ``tool_calls``
    (unless the calls were cut short by ``length``)."""
    if calls_tools:
        parsed = parse(out.text, final=True)
        if parsed.calls:
            calls = tool_calls_json(parsed.calls, [new_call_id() for _ in parsed.calls])
            finish = "tool_calls" if out.finish_reason == "stop" else out.finish_reason
            return {"role": "assistant", "content": None, "tool_calls": calls}, finish
    return {"role": "assistant", "content": out.text}, out.finish_reason


def chat_completion_response(env: Envelope, output: RequestOutput, top_logprobs: Optional[int] = None,
                             calls_tools: bool = False) -> Json:
    """The ``chat.completion`` object for a finished request: one assistant message per completion.
    ``top_logprobs`` is None when logprobs were not asked for (``logprobs: null``), else how many
    alternatives each token lists; ``calls_tools`` reads tool calls out of the text."""
    choices = []
    for out in output.outputs:
        message, finish = assistant_message(out, calls_tools)
        choices.append({"index": out.index, "message": message,
                        "logprobs": chat_logprobs(out.token_ids, out.logprobs, top_logprobs)
                        if top_logprobs is not None else None,
                        "finish_reason": finish})
    generated = sum(len(out.token_ids) for out in output.outputs)
    return env.wrap("chat.completion", choices, usage=usage(len(output.prompt_token_ids), generated))


def chat_chunk(env: Envelope, index: int, delta: Json, logprobs: Optional[Json] = None,
               finish_reason: Optional[str] = None) -> Json:
    """A ``chat.completion.chunk`` with one choice."""
    return env.wrap("chat.completion.chunk", [{"index": index, "delta": delta, "logprobs": logprobs,
                                               "finish_reason": finish_reason}])


def chat_role_chunks(env: Envelope, n: int) -> list[Json]:
    """The first chunk of each of the ``n`` choices: the assistant role and empty content."""
    return [chat_chunk(env, k, {"role": "assistant", "content": ""}) for k in range(n)]


def chat_delta_chunks(env: Envelope, d: StreamDelta, top_logprobs: Optional[int] = None,
                      tools: Optional[ToolCallStream] = None) -> list[Json]:
    """The chunks for delta ``d``: its content (when it has text or logprobs), then an empty delta with
    the finish reason when it ends its choice. ``top_logprobs`` as in ``chat_completion_response``.
    With ``tools`` (the choice's tool-call reader), the text becomes content or ``tool_calls`` fragments
    as it is read, and a choice that called tools finishes with ``tool_calls``."""
    chunks = []
    lp = chat_logprobs(d.token_ids, d.logprobs, top_logprobs) if top_logprobs is not None and d.logprobs else None
    if tools is None:
        if d.text or lp:
            chunks.append(chat_chunk(env, d.index, {"content": d.text}, lp))
    else:
        deltas = tools.feed(d.text, final=d.finish_reason is not None)
        if not deltas and lp:
            deltas = [{"content": ""}]
        for k, delta in enumerate(deltas):
            chunks.append(chat_chunk(env, d.index, delta, lp if k == 0 else None))
    if d.finish_reason is not None:
        finish = d.finish_reason
        if tools is not None and tools.called and finish == "stop":
            finish = "tool_calls"
        chunks.append(chat_chunk(env, d.index, {}, None, finish))
    return chunks


def chat_usage_chunk(env: Envelope, prompt_tokens: int, completion_tokens: int) -> Json:
    """The last chat chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return env.wrap("chat.completion.chunk", [], usage=usage(prompt_tokens, completion_tokens))
