"""Loading and unloading LoRA adapters while the server runs: vLLM's ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``.

Off by default (``loom serve --allow-runtime-lora``; vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): the
routes are then not mounted at all, so they answer 404 like any unknown route, as vLLM's do. Loading reads
a folder on the server's disk that the client names, so enable it only for clients trusted with that.

A load reads and checks the folder in a worker thread, then registers it, like an unload, in the engine
thread between steps (``AsyncEngine.call``), never racing a step or
an ``add_request``. After an unload, requests already queued or running under the adapter finish with all
their tokens; new requests naming it are refused with 404 ``model_not_found``, like any unknown model.
Answers follow vLLM: 200 with a one-line text on success; 400 for a duplicate name, a name the served
model has, an adapter of higher rank than ``--max-lora-rank``, or one for another model (shapes, modules);
404 for a folder that does not exist and for unloading a name that is not loaded.
"""

from __future__ import annotations

import logging
import os

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from loom.engine.adapters import AdapterError
from loom.engine.engine import LLMEngine
from loom.errors import NotFoundError
from loom.serve import openapi as doc
from loom.serve.protocol import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loom.serve.state import ServerState, authorize, server_state

log = logging.getLogger("loom.serve")

router = APIRouter(dependencies=[Depends(authorize)], responses=doc.KEYED)
TEXT = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "What was done"}}


class AdapterNotFoundError(NotFoundError):
    """No adapter folder at the path, or no loaded adapter of the name: HTTP 404 (vLLM's answer)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             openapi_extra=doc.body(LoadLoraAdapterRequest), responses=TEXT | doc.BODY_ERRORS)
async def load_lora_adapter(request: Request, state: ServerState = Depends(server_state)) -> PlainTextResponse:
    """Load the PEFT LoRA adapter folder ``lora_path`` (on the server) as ``lora_name``: later requests
    with ``model: lora_name`` run under it."""
    req = await state.read(request, LoadLoraAdapterRequest)
    name, path = req.lora_name, req.lora_path
    if name in (state.model_name, state.embedding_model_name):
        raise AdapterError(f"{name!r} is the name of a model this server serves; give the adapter another name",
                           param="lora_name")
    if not os.path.isdir(path):
        raise AdapterNotFoundError(f"no adapter folder at {path!r} on the server", "lora_path")
    # Read off the engine's thread (decoding goes on meanwhile); registered between two steps.
    pairs = await run_in_threadpool(state.engine.read_lora, name, path)
    adapter = await state.async_engine.call(lambda engine: engine.add_lora(name, path, pairs))
    log.info("loaded LoRA adapter %r from %s (rank %d, %d modules)", name, path, adapter.rank, len(adapter.modules))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             openapi_extra=doc.body(UnloadLoraAdapterRequest), responses=TEXT | doc.BODY_ERRORS)
async def unload_lora_adapter(request: Request, state: ServerState = Depends(server_state)) -> PlainTextResponse:
    """Unload the adapter ``lora_name``: requests already running under it finish; new ones get 404."""
    req = await state.read(request, UnloadLoraAdapterRequest)
    name = req.lora_name

    def remove(engine: LLMEngine) -> None:
        loaded = [a.name for a in engine.list_loras()]
        if name not in loaded:
            raise AdapterNotFoundError(f"the LoRA adapter {name!r} cannot be found (loaded: "
                                       f"{', '.join(map(repr, loaded)) or 'none'})", "lora_name")
        engine.remove_lora(name)

    await state.async_engine.call(remove)
    log.info("unloaded LoRA adapter %r", name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
