"""The OpenAI-compatible HTTP server, assembled: state, engine thread lifespan, routes, error handlers.

``create_app`` puts a ServerState (``serve/state.py``) on ``app.state.loom``, starts and stops the
engine thread with the app, mounts the routes (``serve/routes.py``) and installs the error handlers
(``serve/errors.py``). Errors follow OpenAI: JSON ``{"error": {"message", "type", "param", "code"}}``
with 400 for a bad request (fields, JSON, UTF-8, context length), 401 for a missing or wrong API key,
404 for unknown models and routes, 413 for oversized bodies and 503 when the waiting queue is full or
the engine has stopped. A client's mistake is answered without touching the engine; a client that
disconnects has its requests aborted and their KV blocks freed.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI

from loom.engine.engine import LLMEngine
from loom.serve.errors import install_error_handlers
from loom.serve.routes import api, router
from loom.serve.state import ServerState
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


def create_app(engine: LLMEngine, tokenizer: Tokenizer, model_name: str = "loom", api_key: str | None = None,
               max_request_bytes: int = 4 << 20) -> FastAPI:
    """An app serving ``engine`` as ``model_name``; ``api_key`` (if set) is required as a Bearer token by
    the /v1 and token routes; bodies over ``max_request_bytes`` are refused."""
    app = FastAPI(title="loom", lifespan=lifespan)
    app.state.loom = ServerState(engine, tokenizer, model_name, api_key, max_request_bytes)
    app.include_router(router)
    app.include_router(api)
    install_error_handlers(app)
    return app
