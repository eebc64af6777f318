"""The server's routes: the chat page, health, metrics, models, tokenize / detokenize, and OpenAI's
completions and chat completions (whole, or streamed as server-sent events).

Handlers are module-level and find the served model in ``request.app.state.loom`` (a ServerState).
``router`` holds the open routes, ``api`` those that need the API key (checked by a dependency before
the handler runs). A handler reads and validates its body, checks the model name and the prompt, and
only then touches the engine; every refusal is a typed exception (``loom.errors``) that
``loom.serve.errors`` answers. The JSON they return is built by ``loom.serve.openai_format``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from loom.errors import EngineUnavailableError, InvalidPromptError, InvalidRequestError
from loom.serve import openai_format as fmt
from loom.serve.body import read_json
from loom.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from loom.serve.state import ServerState, authorize, server_state
from loom.serve.submit import Submission, collect, deltas, submit, until_disconnect

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

State = Annotated[ServerState, Depends(server_state)]
router = APIRouter()  # open to anyone
api = APIRouter(dependencies=[Depends(authorize)])  # the routes that need the API key


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A ``text/event-stream`` response of ``events``."""
    return StreamingResponse(events, media_type="text/event-stream")


# Pages and probes (no API key) -------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def chat_page(state: State) -> HTMLResponse:
    """The chat page, with the served model's name filled in."""
    with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as f:
        return HTMLResponse(f.read().replace("{{MODEL}}", state.model_name))


@router.get("/health")
async def health(state: State) -> Response:
    """``{"status": "ok"}`` while the engine thread runs; 503 once it has died."""
    if state.async_engine.dead is not None:
        raise EngineUnavailableError("the engine has stopped")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus text exposition of the server's metrics."""
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


# Models and tokens -------------------------------------------------------------------------------


@api.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    """The one served model."""
    return fmt.model_list([fmt.model_card(state.model_name, state.created, state.engine.max_model_len)])


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    """The served model's card, or 404 for any other name."""
    state.check_model(model_id)
    return fmt.model_card(state.model_name, state.created, state.engine.max_model_len)


@api.post("/tokenize")
async def tokenize(request: Request, state: State) -> dict[str, Any]:
    """Token ids of a prompt (with special tokens, unless told not to) or of chat messages (templated)."""
    req = await read_json(request, TokenizeRequest, state.max_request_bytes)
    state.check_model(req.model)
    if req.messages is not None:
        ids = state.tokenizer.encode_chat([m.model_dump() | {"content": m.text()} for m in req.messages],
                                          add_generation_prompt=req.add_generation_prompt)
    else:
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}


@api.post("/detokenize")
async def detokenize(request: Request, state: State) -> dict[str, Any]:
    """The text of token ids (each must be in the vocabulary)."""
    req = await read_json(request, DetokenizeRequest, state.max_request_bytes)
    state.check_model(req.model)
    if any(not 0 <= t < state.vocab_size for t in req.tokens):
        raise InvalidRequestError(f"token ids must be in [0, {state.vocab_size})", param="tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}


# Completions -------------------------------------------------------------------------------------


def completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    """Token ids of each prompt (text is encoded); InvalidPromptError for an empty one or ids outside
    the vocabulary."""
    prompts = []
    for p in req.prompts():
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidPromptError("prompt must not be empty")
        if any(not 0 <= t < state.vocab_size for t in ids):
            raise InvalidPromptError(f"prompt token ids must be in [0, {state.vocab_size})")
        prompts.append(ids)
    return prompts


async def completion_events(stream: fmt.CompletionStream, sub: Submission, include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of a streamed completion: a chunk per delta, the usage chunk if asked, [DONE]."""
    async for i, d in deltas(sub):
        yield fmt.sse(stream.chunk(i, d))
    if include_usage:
        yield fmt.sse(stream.usage_chunk())
    yield fmt.SSE_DONE


@api.post("/v1/completions")
async def completions(request: Request, state: State) -> Response:
    """OpenAI's legacy completions: several prompts, ``n`` choices each, ``echo``, ``logprobs``.
    ``max_tokens: 0`` with ``echo`` scores the prompt without generating (what lm-evaluation-harness
    asks for)."""
    req = await read_json(request, CompletionRequest, state.max_request_bytes)
    state.check_model(req.model)
    prompts = completion_prompts(state, req)
    echo_only = req.max_tokens == 0
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = req.sampling_params(1 if echo_only else req.max_tokens, logprobs=req.logprobs,
                                 prompt_logprobs=prompt_logprobs, vocab_size=state.vocab_size)
    env = fmt.Envelope(f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
    sub = await submit(state.async_engine, prompts, params, env.id)
    shape = dict(echo=req.echo, echo_only=echo_only, logprobs=req.logprobs is not None)
    if req.stream:
        stream = fmt.CompletionStream(env, prompts, req.n, state.tokenizer.decode, **shape)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(completion_events(stream, sub, include_usage))
    outputs = await until_disconnect(request, collect(sub))
    return JSONResponse(fmt.completion_response(env, outputs, state.tokenizer.decode, **shape))


# Chat completions --------------------------------------------------------------------------------


async def chat_events(env: fmt.Envelope, sub: Submission, n: int, top_logprobs: int | None,
                      include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of a streamed chat completion: each choice's role chunk, its content and finish
    chunks as deltas arrive, the usage chunk if asked, [DONE]."""
    for chunk in fmt.chat_role_chunks(env, n):
        yield fmt.sse(chunk)
    generated = 0
    async for _, d in deltas(sub):
        generated += len(d.token_ids)
        for chunk in fmt.chat_delta_chunks(env, d, top_logprobs):
            yield fmt.sse(chunk)
    if include_usage:
        yield fmt.sse(fmt.chat_usage_chunk(env, len(sub.requests[0].prompt_ids), generated))
    yield fmt.SSE_DONE


@api.post("/v1/chat/completions")
async def chat_completions(request: Request, state: State) -> Response:
    """OpenAI's chat completions: the messages through the model's chat template, ``n`` choices,
    ``logprobs`` / ``top_logprobs``."""
    req = await read_json(request, ChatCompletionRequest, state.max_request_bytes)
    state.check_model(req.model)
    ids = state.tokenizer.encode_chat(req.chat_messages(), add_generation_prompt=req.add_generation_prompt)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_params(req.max_new_tokens, logprobs=top_logprobs, vocab_size=state.vocab_size)
    env = fmt.Envelope(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name)
    sub = await submit(state.async_engine, [ids], params, env.id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(chat_events(env, sub, req.n, top_logprobs, include_usage))
    (output,) = await until_disconnect(request, collect(sub))
    return JSONResponse(fmt.chat_completion_response(env, output, top_logprobs))

