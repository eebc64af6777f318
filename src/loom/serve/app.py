"""The OpenAI-compatible HTTP server: routes, server-sent events, errors, limits, metrics.

Errors follow OpenAI: JSON ``{"error": {"message", "type", "param", "code"}}`` with 400 for a bad
request (fields, JSON, UTF-8, context length), 401 for a missing or wrong API key, 404 for unknown
models and routes, 413 for oversized bodies and 503 when the waiting queue is full. A client's
mistake is answered without touching the engine; a client that disconnects has its requests
aborted and their KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loom.engine.engine import LLMEngine, QueueFullError
from loom.outputs import PositionLogprobs, StreamDelta
from loom.serve.async_engine import AsyncEngine, EngineDeadError
from loom.serve.metrics import Metrics
from loom.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                 TokenizeRequest)
from loom.tokenizer import ChatTemplateError, Tokenizer

log = logging.getLogger("loom.serve")
M = TypeVar("M", bound=BaseModel)
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class ServerState:
    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None,
                 max_request_bytes: int) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.metrics = Metrics(engine, model_name)
        self.async_engine = AsyncEngine(engine, on_finished=self.metrics.request_finished)
        self.created = int(time.time())


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_json(request: Request, model: type[M], limit: int) -> M:
    """The body, parsed and validated; every way it can be wrong is a 4xx with a clear message."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        elif param:
            message = f"{param}: {message}"
        raise APIError(400, message, param=param) from None


def _logprob_entries(tokenizer: Tokenizer, chosen: int, entry: PositionLogprobs) -> tuple[str, float, dict[str, float]]:
    token = tokenizer.decode([chosen])
    top = {tokenizer.decode([t]): lp.logprob for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank)}
    return token, entry[chosen].logprob, top


class _Completion:
    """Accumulates one choice (text, tokens, logprobs) of a non-streamed response."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[PositionLogprobs] = []
        self.finish_reason: str | None = None


def create_app(engine: LLMEngine, tokenizer: Tokenizer, model_name: str = "loom", api_key: str | None = None,
               max_request_bytes: int = 4 << 20) -> FastAPI:
    state = ServerState(engine, tokenizer, model_name, api_key, max_request_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.async_engine.start()
        log.info("serving %s; %s", model_name, engine.describe())
        yield
        state.async_engine.stop()

    app = FastAPI(title="loom", lifespan=lifespan)
    app.state.loom = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error_response(APIError(e.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), state.api_key):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist (this server serves {state.model_name!r})",
                           type="not_found_error", param="model", code="model_not_found")

    async def submit(prompts: list[list[int]], params, prefix: str) -> tuple[list[str], asyncio.Queue]:
        """Queue one engine request per prompt on a shared queue; on any refusal, withdraw them all."""
        out: asyncio.Queue = asyncio.Queue()
        rids: list[str] = []
        try:
            for i, ids in enumerate(prompts):
                rid = f"{prefix}-{i}"
                await state.async_engine.add(rid, ids, params, out)
                rids.append(rid)
        except QueueFullError as e:
            for rid in rids:
                state.async_engine.abort(rid)
            raise APIError(503, f"the server is busy: {e}", type="service_unavailable", code="queue_full") from None
        except EngineDeadError as e:
            for rid in rids:
                state.async_engine.abort(rid)
            raise APIError(503, str(e), type="service_unavailable") from None
        except ValueError as e:
            for rid in rids:
                state.async_engine.abort(rid)
            raise APIError(400, str(e), param="prompt" if "prompt" in str(e) or "context" in str(e) else None,
                           code="context_length_exceeded" if "context" in str(e) else None) from None
        return rids, out

    async def deltas(rids: list[str], out: asyncio.Queue, n: int) -> AsyncIterator[tuple[int, StreamDelta]]:
        """(prompt index, delta) until every choice has finished; aborts what is left if the consumer stops."""
        index = {rid: i for i, rid in enumerate(rids)}
        open_choices = len(rids) * n
        try:
            while open_choices:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise APIError(500, str(item), type="server_error")
                if item.finish_reason is not None:
                    open_choices -= 1
                yield index[item.request_id], item
        finally:
            if open_choices:
                for rid in rids:
                    state.async_engine.abort(rid)

    async def until_disconnect(request: Request, work: asyncio.Task) -> Any:
        """Await ``work``; if the client goes away first, cancel it (which aborts its requests)."""
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                raise APIError(499, "client disconnected")

    def sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    # Routes ------------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        with open(os.path.join(STATIC, "chat.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read().replace("{{MODEL}}", state.model_name))

    @app.get("/health")
    async def health() -> Response:
        if state.async_engine.dead is not None:
            return _error_response(APIError(503, "the engine has stopped", type="service_unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "loom",
                "max_model_len": state.engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        req = await _read_json(request, TokenizeRequest, state.max_request_bytes)
        check_model(req.model)
        try:
            if req.messages is not None:
                ids = state.tokenizer.encode_chat([m.model_dump() | {"content": m.text()} for m in req.messages],
                                                  add_generation_prompt=req.add_generation_prompt)
            else:
                ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        req = await _read_json(request, DetokenizeRequest, state.max_request_bytes)
        check_model(req.model)
        vocab = state.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = await _read_json(request, CompletionRequest, state.max_request_bytes)
        check_model(req.model)
        tok = state.tokenizer
        vocab = state.engine.model.config.vocab_size
        prompts: list[list[int]] = []
        for p in req.prompts():
            ids = tok.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompts.append(ids)
        echo_only = req.max_tokens == 0  # lm-evaluation-harness: score the prompt, generate nothing
        want_prompt_lp = req.echo and req.logprobs is not None
        params = req.sampling_params(1 if echo_only else req.max_tokens, logprobs=req.logprobs,
                                     prompt_logprobs=req.logprobs if want_prompt_lp else None, vocab_size=vocab)
        cid = f"cmpl-{uuid.uuid4().hex}"
        rids, out = await submit(prompts, params, cid)
        created, n = int(time.time()), req.n

        def prompt_part(i: int, d: StreamDelta) -> tuple[str, dict[str, list]]:
            """Echoed prompt text and its logprobs (first token: null)."""
            text = tok.decode(prompts[i])
            lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if want_prompt_lp and d.prompt_logprobs is not None:
                offset = 0
                for pos, t in enumerate(prompts[i]):
                    piece = tok.decode([t])
                    lp["tokens"].append(piece)
                    lp["text_offset"].append(offset)
                    offset += len(piece)
                    entry = d.prompt_logprobs[pos]
                    if entry is None:
                        lp["token_logprobs"].append(None)
                        lp["top_logprobs"].append(None)
                    else:
                        _, value, top = _logprob_entries(tok, t, entry)
                        lp["token_logprobs"].append(value)
                        lp["top_logprobs"].append(top)
            return text, lp

        def gen_logprobs(d: StreamDelta, offset: int) -> dict[str, list]:
            lp: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for t, entry in zip(d.token_ids, d.logprobs or []):
                token, value, top = _logprob_entries(tok, t, entry)
                lp["tokens"].append(token)
                lp["token_logprobs"].append(value)
                lp["top_logprobs"].append(top)
                lp["text_offset"].append(offset)
                offset += len(token)
            return lp

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream() -> AsyncIterator[str]:
                generated = 0
                offsets = [0] * (len(prompts) * n)
                echoed: set[int] = set()
                firsts: dict[int, StreamDelta] = {}  # prompt i -> the delta that carried its prompt logprobs
                async for i, d in deltas(rids, out, n):
                    choice = i * n + d.index
                    if d.prompt_token_ids is not None:
                        firsts[i] = d
                    text, lp = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    if req.echo and choice not in echoed:
                        echoed.add(choice)
                        text, lp = prompt_part(i, firsts.get(i, d))
                        offsets[choice] = len(text)
                    if not echo_only:
                        generated += len(d.token_ids)
                        g = gen_logprobs(d, offsets[choice])
                        for k in lp:
                            lp[k] += g[k]
                        text += d.text
                        offsets[choice] += len(d.text)
                    finish = "length" if echo_only and d.finish_reason is not None else d.finish_reason
                    yield sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                               "choices": [{"index": choice, "text": text,
                                            "logprobs": lp if req.logprobs is not None else None,
                                            "finish_reason": finish}]})
                if include_usage:
                    prompt_tokens = sum(len(p) for p in prompts)
                    yield sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                               "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                                        "total_tokens": prompt_tokens + generated}})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        async def collect() -> dict[str, Any]:
            choices = [_Completion() for _ in range(len(prompts) * n)]
            first: dict[int, StreamDelta] = {}
            async for i, d in deltas(rids, out, n):
                c = choices[i * n + d.index]
                if d.prompt_token_ids is not None:
                    first[i] = d
                c.text.append(d.text)
                c.tokens += d.token_ids
                c.logprobs += d.logprobs or []
                if d.finish_reason is not None:
                    c.finish_reason = d.finish_reason
            body_choices, generated = [], 0
            for k, c in enumerate(choices):
                i = k // n
                text, lp = ("", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
                if req.echo:
                    text, lp = prompt_part(i, first.get(i, StreamDelta("", [])))
                finish = c.finish_reason
                if echo_only:
                    finish = "length"
                else:
                    generated += len(c.tokens)
                    g = gen_logprobs(StreamDelta("", c.tokens, logprobs=c.logprobs), len(text))
                    for key in lp:
                        lp[key] += g[key]
                    text += "".join(c.text)
                body_choices.append({"index": k, "text": text, "logprobs": lp if req.logprobs is not None else None,
                                     "finish_reason": finish})
            prompt_tokens = sum(len(p) for p in prompts)
            return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": body_choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                              "total_tokens": prompt_tokens + generated}}

        return JSONResponse(await until_disconnect(request, asyncio.create_task(collect())))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = await _read_json(request, ChatCompletionRequest, state.max_request_bytes)
        check_model(req.model)
        tok = state.tokenizer
        try:
            ids = tok.encode_chat(req.chat_messages(), add_generation_prompt=req.add_generation_prompt)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        params = req.sampling_params(req.max_new_tokens, logprobs=top_n, vocab_size=state.engine.model.config.vocab_size)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        rids, out = await submit([ids], params, cid)
        created, n = int(time.time()), req.n

        def chat_logprobs(tokens: list[int], entries: list[PositionLogprobs]) -> dict[str, Any]:
            content = []
            for t, entry in zip(tokens, entries):
                token = tok.decode([t])
                top = sorted(entry.items(), key=lambda kv: kv[1].rank)[: top_n or 0]
                content.append({"token": token, "logprob": entry[t].logprob, "bytes": list(token.encode("utf-8")),
                                "top_logprobs": [{"token": tok.decode([u]), "logprob": lp.logprob,
                                                  "bytes": list(tok.decode([u]).encode("utf-8"))} for u, lp in top]})
            return {"content": content}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": state.model_name, "choices": choices, **extra})

            async def stream() -> AsyncIterator[str]:
                for k in range(n):  # the first delta of every choice carries the role
                    yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                generated = 0
                async for _, d in deltas(rids, out, n):
                    generated += len(d.token_ids)
                    lp = chat_logprobs(d.token_ids, d.logprobs) if req.logprobs and d.logprobs else None
                    if d.text or lp:
                        yield chunk([{"index": d.index, "delta": {"content": d.text}, "logprobs": lp,
                                      "finish_reason": None}])
                    if d.finish_reason is not None:
                        yield chunk([{"index": d.index, "delta": {}, "logprobs": None,
                                      "finish_reason": d.finish_reason}])
                if include_usage:
                    yield chunk([], usage={"prompt_tokens": len(ids), "completion_tokens": generated,
                                           "total_tokens": len(ids) + generated})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        async def collect() -> dict[str, Any]:
            choices = [_Completion() for _ in range(n)]
            async for _, d in deltas(rids, out, n):
                c = choices[d.index]
                c.text.append(d.text)
                c.tokens += d.token_ids
                c.logprobs += d.logprobs or []
                if d.finish_reason is not None:
                    c.finish_reason = d.finish_reason
            generated = sum(len(c.tokens) for c in choices)
            return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                    "choices": [{"index": k, "message": {"role": "assistant", "content": "".join(c.text)},
                                 "logprobs": chat_logprobs(c.tokens, c.logprobs) if req.logprobs else None,
                                 "finish_reason": c.finish_reason} for k, c in enumerate(choices)],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": generated,
                              "total_tokens": len(ids) + generated}}

        return JSONResponse(await until_disconnect(request, asyncio.create_task(collect())))

    return app
