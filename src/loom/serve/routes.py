"""The server's routes: the chat page, health, metrics, models, tokenize / detokenize, and OpenAI's
completions and chat completions (whole, or streamed as server-sent events). A request whose ``model``
names a loaded LoRA adapter runs under it, and its response names the adapter (``serve/lora.py`` has the
routes that load and unload adapters at run time).

Handlers are module-level and find the served model in ``request.app.state.loom`` (a ServerState).
``router`` holds the open routes, ``api`` those that need the API key (checked by a dependency before
the handler runs). A handler reads and validates its body, checks the model name and the prompt, and
only then touches the engine; every refusal is a typed exception (``loom.errors``) that
``loom.serve.errors`` answers. The JSON they return is built by ``loom.serve.openai_format``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from loom.engine.adapters import Adapter
from loom.errors import EngineUnavailableError, InvalidPromptError, InvalidRequestError, ModelNotFoundError
from loom.serve import openai_format as fmt
from loom.serve import openapi as doc
from loom.serve.embeddings import embedding_card
from loom.serve.errors import RequestFailedError, error_payload
from loom.serve.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                 check_limits)
from loom.serve.state import ServerState, authorize, server_state
from loom.serve.submit import Submission, collect, deltas, submit, until_disconnect
from loom.serve.tool_parser import ToolCallStream
from loom.serve.tools import template_knows_tools

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
log = logging.getLogger("loom.serve")

State = Annotated[ServerState, Depends(server_state)]
router = APIRouter()  # open to anyone
api = APIRouter(dependencies=[Depends(authorize)], responses=doc.KEYED)  # the routes that need the API key


async def ending_with_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """``events``; if the engine ends the request early (a failed step, shutdown), an error event in
    OpenAI's error JSON and ``[DONE]``, so the client sees why the stream stopped."""
    try:
        async for event in events:
            yield event
    except (RequestFailedError, EngineUnavailableError) as e:
        log.warning("a stream ended early: %s", e)
        yield fmt.sse(error_payload(e)[1])
        yield fmt.SSE_DONE


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A ``text/event-stream`` response of ``events``."""
    return StreamingResponse(ending_with_error(events), media_type="text/event-stream")


# Pages and probes (no API key) -------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page(state: State) -> HTMLResponse:
    """The chat page, with the served model's name filled in."""
    with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as f:
        return HTMLResponse(f.read().replace("{{MODEL}}", state.model_name))


@router.get("/health", response_model=doc.Health, responses={503: doc.ERRORS[503]})
async def health(state: State) -> Response:
    """``{"status": "ok"}`` while the engine thread runs; 503 once it has died or lost a tensor-parallel rank."""
    if state.async_engine.dead is not None:
        raise EngineUnavailableError(f"the engine has stopped: {state.async_engine.dead}")
    problem = state.engine.health_problem()
    if problem is not None:  # a tensor-parallel rank was lost (the engine thread has not noticed yet)
        raise EngineUnavailableError(problem)
    return JSONResponse({"status": "ok"})


@api.get("/metrics", response_class=Response,
         responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                          "description": "Prometheus text exposition format 0.0.4"}})
async def metrics(state: State) -> Response:
    """Prometheus text exposition of the server's metrics (behind the API key when one is set)."""
    return Response(state.metrics.render(state.async_engine.adapter_activity), media_type="text/plain; version=0.0.4")


# Models and tokens -------------------------------------------------------------------------------


def model_card(state: ServerState) -> dict[str, Any]:
    """The served model's card (``root``: its folder or file; ``parent``: null)."""
    return fmt.model_card(state.model_name, state.created, state.engine.max_model_len, root=state.model_root)


def adapter_card(state: ServerState, adapter: Adapter) -> dict[str, Any]:
    """A LoRA adapter's card, as vLLM lists them: ``root`` its folder, ``parent`` the served model."""
    return fmt.model_card(adapter.name, state.created, state.engine.max_model_len, root=adapter.path,
                          parent=state.model_name)


@api.get("/v1/models", response_model=doc.ModelList)
async def list_models(state: State) -> dict[str, Any]:
    """The served model, each LoRA adapter loaded (its ``parent`` is the served model), and the embedding
    model, when it is another."""
    embedding = embedding_card(state)
    adapters = state.engine.adapters
    loras = [] if adapters is None else list(adapters.registered.values())  # a copy, taken at once
    return fmt.model_list([model_card(state)] + [adapter_card(state, a) for a in loras]
                          + ([embedding] if embedding else []))


@api.get("/v1/models/{model_id:path}", response_model=doc.ModelCard, responses=doc.errors(404))
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    """The served model's card (or a LoRA adapter's, or the embedding model's), or 404 for any other name."""
    embedding = embedding_card(state, model_id)
    if embedding:
        return embedding
    lora = state.check_model(model_id)
    if lora is None:
        return model_card(state)
    adapter = state.engine.adapters.registered.get(lora)  # type: ignore[union-attr]
    if adapter is None:  # unloaded since check_model saw it
        raise ModelNotFoundError(f"the model {lora!r} does not exist (its LoRA adapter was unloaded)")
    return adapter_card(state, adapter)


@api.post("/tokenize", response_model=doc.TokenizeResponse, openapi_extra=doc.body(TokenizeRequest),
          responses=doc.BODY_ERRORS)
async def tokenize(request: Request, state: State) -> dict[str, Any]:
    """Token ids of a prompt (with special tokens, unless told not to) or of chat messages (templated)."""
    req = await state.read(request, TokenizeRequest)
    state.check_model(req.model)
    if req.messages is not None:
        ids = state.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages],
                                          add_generation_prompt=req.add_generation_prompt)
    else:
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}


@api.post("/detokenize", response_model=doc.DetokenizeResponse, openapi_extra=doc.body(DetokenizeRequest),
          responses=doc.BODY_ERRORS)
async def detokenize(request: Request, state: State) -> dict[str, Any]:
    """The text of token ids (each must be in the vocabulary)."""
    req = await state.read(request, DetokenizeRequest)
    state.check_model(req.model)
    if any(not 0 <= t < state.vocab_size for t in req.tokens):
        raise InvalidRequestError(f"token ids must be in [0, {state.vocab_size})", param="tokens")
    return {"prompt": state.tokenizer.decode(req.tokens)}


@api.get("/tokenizer_info", response_model=doc.TokenizerInfo)
async def tokenizer_info(state: State) -> dict[str, Any]:
    """What a client needs to tokenize as the server does: the special tokens, whether BOS is added, the
    chat template, the context (lm-evaluation-harness's ``tokenizer_backend=remote`` reads this)."""
    return state.tokenizer.config(state.engine.max_model_len) | {"vocab_size": state.vocab_size}


@api.get("/tokenizer/tokenizer.json", response_class=Response,
         responses={200: {"content": {"application/json": {"schema": {"type": "object"}}},
                          "description": "The tokenizer as HF tokenizers' tokenizer.json"}})
async def tokenizer_json(state: State) -> Response:
    """The tokenizer file itself: save it with ``/tokenizer/tokenizer_config.json`` in a folder and
    ``transformers.AutoTokenizer.from_pretrained(folder)`` tokenizes exactly as the server does."""
    return Response(state.tokenizer.to_json(), media_type="application/json")


@api.get("/tokenizer/tokenizer_config.json", response_model=dict[str, Any])
async def tokenizer_config(state: State) -> dict[str, Any]:
    """The tokenizer's ``tokenizer_config.json`` (special tokens, BOS rule, chat template, context)."""
    return state.tokenizer.config(state.engine.max_model_len)


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


async def completion_events(stream: fmt.CompletionStream, sub: Submission, req: CompletionRequest) -> AsyncIterator[str]:
    """The SSE events of a streamed completion: a chunk per delta (with the usage so far if asked), the
    usage chunk if asked, [DONE]."""
    async for i, d in deltas(sub):
        chunk = stream.chunk(i, d)
        if req.continuous_usage:
            chunk["usage"] = stream.usage_chunk()["usage"]
        yield fmt.sse(chunk)
    if req.include_usage:
        yield fmt.sse(stream.usage_chunk())
    yield fmt.SSE_DONE


@api.post("/v1/completions", openapi_extra=doc.body(CompletionRequest),
          responses=doc.streamed(doc.CompletionResponse, doc.CompletionResponse) | doc.BODY_ERRORS)
async def completions(request: Request, state: State) -> Response:
    """OpenAI's legacy completions: several prompts, ``n`` choices each, ``echo``, ``logprobs``.
    ``max_tokens: 0`` with ``echo`` scores the prompt without generating (what lm-evaluation-harness
    asks for)."""
    req = await state.read(request, CompletionRequest)
    lora = state.check_model(req.model)
    check_limits(req, state.limits, len(req.prompts()))
    prompts = completion_prompts(state, req)
    echo_only = req.max_tokens == 0
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = req.sampling_params(1 if echo_only else req.max_tokens, logprobs=req.logprobs,
                                 prompt_logprobs=prompt_logprobs, vocab_size=state.vocab_size)
    env = fmt.Envelope(f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.response_model(lora))
    sub = await submit(state.async_engine, prompts, params, env.id, lora)
    shape = dict(echo=req.echo, echo_only=echo_only, logprobs=req.logprobs is not None)
    if req.stream:
        stream = fmt.CompletionStream(env, prompts, req.n, state.tokenizer.decode, **shape)
        return sse_response(completion_events(stream, sub, req))
    outputs = await until_disconnect(request, collect(sub))
    return JSONResponse(fmt.completion_response(env, outputs, state.tokenizer.decode, **shape))


# Chat completions --------------------------------------------------------------------------------


async def chat_events(env: fmt.Envelope, sub: Submission, req: ChatCompletionRequest,
                      top_logprobs: int | None) -> AsyncIterator[str]:
    """The SSE events of a streamed chat completion: each choice's role chunk, its content and finish
    chunks as deltas arrive (each with the usage so far if asked), the usage chunk if asked, [DONE]."""
    prompt_tokens, generated = len(sub.requests[0].prompt_ids), 0

    def event(chunk: dict[str, Any]) -> str:
        if req.continuous_usage:
            chunk["usage"] = fmt.usage(prompt_tokens, generated)
        return fmt.sse(chunk)

    readers = [ToolCallStream() for _ in range(req.n)] if req.calls_tools else None
    for chunk in fmt.chat_role_chunks(env, req.n):
        yield event(chunk)
    async for _, d in deltas(sub):
        generated += len(d.token_ids)
        for chunk in fmt.chat_delta_chunks(env, d, top_logprobs, readers[d.index] if readers else None):
            yield event(chunk)
    if req.include_usage:
        yield fmt.sse(fmt.chat_usage_chunk(env, prompt_tokens, generated))
    yield fmt.SSE_DONE


def chat_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    """Token ids of the request's messages through the chat template, given ``chat_template_kwargs`` (and
    the tools, for a template that renders them) as extra variables (a ChatTemplateError, a 400, if the
    template fails on them)."""
    knows_tools = template_knows_tools(state.tokenizer.chat_template)
    return state.tokenizer.encode_chat(req.chat_messages(knows_tools), add_generation_prompt=req.add_generation_prompt,
                                       **req.template_kwargs(knows_tools))


@api.post("/v1/chat/completions", openapi_extra=doc.body(ChatCompletionRequest),
          responses=doc.streamed(doc.ChatCompletionResponse, doc.ChatCompletionChunk) | doc.BODY_ERRORS)
async def chat_completions(request: Request, state: State) -> Response:
    """OpenAI's chat completions: the messages through the model's chat template, ``n`` choices,
    ``logprobs`` / ``top_logprobs``, ``tools`` (calls returned as ``tool_calls``; see ``serve/tools.py``)."""
    req = await state.read(request, ChatCompletionRequest)
    lora = state.check_model(req.model)
    check_limits(req, state.limits)
    ids = chat_prompt(state, req)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = req.sampling_params(req.max_new_tokens, logprobs=top_logprobs, vocab_size=state.vocab_size)
    env = fmt.Envelope(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.response_model(lora))
    sub = await submit(state.async_engine, [ids], params, env.id, lora)
    if req.stream:
        return sse_response(chat_events(env, sub, req, top_logprobs))
    (output,) = await until_disconnect(request, collect(sub))
    return JSONResponse(fmt.chat_completion_response(env, output, top_logprobs, req.calls_tools))

