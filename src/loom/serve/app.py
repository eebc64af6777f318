"""The OpenAI-compatible HTTP server, assembled: state, engine thread lifespan, routes, error handlers.

``create_app`` puts a ServerState (``serve/state.py``) on ``app.state.loom``, starts and stops the
engine thread with the app, mounts the routes (``serve/routes.py``) and the API description
(``serve/openapi.py``), and installs the error handlers (``serve/errors.py``). Errors follow OpenAI:
JSON ``{"error": {"message", "type", "param", "code"}}`` with 400 for a bad request (fields, JSON,
UTF-8, context length, limits), 401 for a missing or wrong API key, 404 for unknown models and routes,
408 for a body that does not arrive in time, 413 for oversized bodies and 503 when the waiting queue is
full or the engine has stopped. A client's mistake is answered without touching the engine; a client
that disconnects has its requests aborted and their KV blocks freed. With an API key, everything but
``/health`` and the chat page needs it (the API description too, unless ``public_docs``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI

from loom.engine.embedder import Embedder
from loom.engine.engine import LLMEngine
from loom.serve import embeddings, lora, responses
from loom.serve.errors import install_error_handlers
from loom.serve.openapi import install_api_description
from loom.serve.protocol import RequestLimits
from loom.serve.routes import api, router
from loom.serve.state import MAX_EMBEDDING_INPUTS, ServerState
from loom.tokenizer import Tokenizer

log = logging.getLogger("loom.serve")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the engine thread while the app serves."""
    state: ServerState = app.state.loom
    state.async_engine.start()
    log.info("serving %s; %s", state.model_name, state.engine.describe())
    yield
    state.async_engine.stop()


def bare_app(title: str = "loom", public_docs: bool = True, **fastapi_kwargs: object) -> FastAPI:
    """The app's routes, API description and error handlers, without a served model."""
    app = FastAPI(title=title, summary="An OpenAI-compatible LLM server", docs_url=None, redoc_url=None,
                  openapi_url=None, **fastapi_kwargs)  # type: ignore[arg-type]
    app.include_router(router)
    app.include_router(api)
    app.include_router(embeddings.router)
    app.include_router(responses.router)
    install_api_description(app, public=public_docs)
    install_error_handlers(app)
    return app


def api_description() -> dict:
    """The server's OpenAPI document (what ``GET /openapi.json`` answers), without starting a server."""
    return bare_app().openapi()


def create_app(engine: LLMEngine, tokenizer: Tokenizer, model_name: str = "loom", api_key: str | None = None,
               max_request_bytes: int = 4 << 20, body_timeout_s: float | None = 30.0,
               limits: RequestLimits = RequestLimits(), public_docs: bool = False, embedder: Embedder | None = None,
               embedding_model_name: str | None = None, max_embedding_inputs: int = MAX_EMBEDDING_INPUTS,
               model_root: str | None = None, allow_runtime_lora: bool = False) -> FastAPI:
    """An app serving ``engine`` as ``model_name``; ``api_key`` (if set) is required as a Bearer token by
    every route but /health and the chat page; bodies over ``max_request_bytes`` or slower than
    ``body_timeout_s`` are refused; ``limits`` bound each request's work; ``public_docs`` serves
    /openapi.json and /docs without the key. ``embedder`` (named ``embedding_model_name``) answers the
    embedding routes; without one the served model embeds, under ``model_name``. The engine's LoRA adapters
    (``lora_serving``) are models of their own, named as loaded; ``allow_runtime_lora`` mounts the routes
    that load and unload them (``serve/lora.py``). ``model_root``: the weights' path, for /v1/models."""
    loaded = [a.name for a in engine.list_loras()]
    clash = {model_name, embedding_model_name or model_name} & set(loaded)
    if clash:
        raise ValueError(f"a LoRA adapter may not take the name of a served model: {sorted(clash)}")
    if allow_runtime_lora and engine.adapters is None:
        raise ValueError("loading LoRA adapters at run time needs an engine that serves them (lora_serving)")
    app = bare_app(public_docs=public_docs or api_key is None, lifespan=lifespan)
    if allow_runtime_lora:
        app.include_router(lora.router)
    app.state.loom = ServerState(engine, tokenizer, model_name, api_key, max_request_bytes, body_timeout_s, limits,
                                 embedder, embedding_model_name, max_embedding_inputs, model_root, allow_runtime_lora)
    return app
