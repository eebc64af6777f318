"""What a server holds (``app.state.loom``): the engine and its thread, the tokenizer, the served name, the
API key, the limits on request bodies and per-request work, the metrics, and the embedding model; and the
checks every route makes against them. A request's ``model`` is the served name (the base model) or the name
of one of the engine's LoRA adapters (``engine/adapters.py``), which it then runs under."""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import Request

from loom.engine.embedder import Embedder
from loom.engine.engine import LLMEngine
from loom.errors import AuthenticationError, ModelNotFoundError
from loom.serve.async_engine import AsyncEngine
from loom.serve.body import M, read_json
from loom.serve.metrics import Metrics
from loom.serve.protocol import RequestLimits
from loom.serve.response_store import ResponseStore
from loom.tokenizer import Tokenizer

MAX_EMBEDDING_INPUTS = 2048  # inputs of one embeddings request (OpenAI's limit), documents of one rerank


class ServerState:
    """One served model: ``engine`` runs in ``async_engine``'s thread; ``metrics`` counts its requests."""

    def __init__(self, engine: LLMEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None,
                 max_request_bytes: int, body_timeout_s: float | None = 30.0,
                 limits: RequestLimits = RequestLimits(), embedder: Embedder | None = None,
                 embedding_model_name: str | None = None, max_embedding_inputs: int = MAX_EMBEDDING_INPUTS,
                 model_root: str | None = None, allow_runtime_lora: bool = False) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_root = model_root or model_name  # the base model's folder or file (its card's ``root``)
        self.allow_runtime_lora = allow_runtime_lora  # /v1/load_lora_adapter and /v1/unload_lora_adapter
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.limits = limits
        self.metrics = Metrics(engine, model_name)
        self.responses = ResponseStore()  # for /v1/responses' previous_response_id
        self.async_engine = AsyncEngine(engine, on_finished=self.metrics.request_finished)
        self.created = int(time.time())
        # Embeddings (serve/embeddings.py): a model of their own, else the served decoder's pooled states under
        # its name; forward passes run one at a time in their own thread, off the event loop.
        self.embedder = embedder or Embedder.for_decoder(engine.embedding_model, tokenizer, engine.max_model_len)
        self.embedding_model_name = embedding_model_name or model_name
        self.max_embedding_inputs = max_embedding_inputs
        self.embedding_executor = ThreadPoolExecutor(1, thread_name_prefix="loom-embed")

    @property
    def vocab_size(self) -> int:
        """Token ids a request may use are in ``[0, vocab_size)``."""
        return self.engine.model.config.vocab_size

    def check_api_key(self, authorization: str) -> None:
        """Raise AuthenticationError unless no key is set or ``authorization`` is ``Bearer <the key>``."""
        if self.api_key is None:
            return
        scheme, _, token = authorization.partition(" ")
        # bytes, since compare_digest refuses str with non-ASCII characters (headers arrive as latin-1)
        sent = token.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not secrets.compare_digest(sent, self.api_key.encode("utf-8")):
            raise AuthenticationError("missing or invalid API key (send 'Authorization: Bearer <key>')")

    async def read(self, request: Request, model: type[M]) -> M:
        """The request's body validated as ``model``, within the server's size and time limits."""
        return await read_json(request, model, self.max_request_bytes, self.body_timeout_s)

    def adapter_names(self) -> list[str]:
        """The LoRA adapters loaded now, in load order (a copy: the engine thread may change the registry)."""
        return [] if self.engine.adapters is None else list(self.engine.adapters.registered)

    def check_model(self, name: Optional[str]) -> Optional[str]:
        """The LoRA adapter a request's ``model`` names, None for the served model (or no name); raise
        ModelNotFoundError for any other name. (The engine thread checks the adapter again when the request
        arrives there: it may have been unloaded in between.)"""
        if name is None or name == self.model_name:
            return None
        adapters = self.engine.adapters
        if adapters is not None and name in adapters.registered:
            return name
        loaded = self.adapter_names()
        also = f" and the LoRA adapters {', '.join(map(repr, loaded))}" if loaded else ""
        raise ModelNotFoundError(f"the model {name!r} does not exist (this server serves {self.model_name!r}{also})")

    def response_model(self, lora: Optional[str]) -> str:
        """The ``model`` a response names: the adapter it ran under, else the served model."""
        return lora if lora is not None else self.model_name


def server_state(request: Request) -> ServerState:
    """The state of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.loom


def authorize(request: Request) -> None:
    """A FastAPI dependency: refuse the request (401) unless it carries the server's API key."""
    server_state(request).check_api_key(request.headers.get("authorization", ""))
