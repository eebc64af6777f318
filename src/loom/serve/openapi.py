"""The server's API description (OpenAPI 3.1): the real request and response schemas of every route.

Routes read their bodies themselves (``serve/body.py``: size and time limits, errors in OpenAI's JSON),
so FastAPI cannot see their request models; ``body(Model)`` declares one for the description, and
``install_api_description`` puts every declared model's JSON schema under ``components/schemas``.
The response models below describe what ``serve/openai_format.py`` builds (they are documentation,
checked against real responses by the tests, not used to build them). ``ERRORS`` lists the error
answers, by status.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from loom.serve.state import authorize

Json = dict[str, Any]
REF = "#/components/schemas/{model}"

_declared: dict[str, type[BaseModel]] = {}  # request models named in the description


class ErrorObject(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the answer to every refused request."""

    error: ErrorObject


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions ``logprobs`` object (``null`` entries for the echoed prompt's first token)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


FinishReason = Optional[Literal["stop", "length", "abort", "tool_calls"]]


class Envelope(BaseModel):
    """What every completion object and chunk carries (``openai_format.Envelope``)."""

    id: str
    created: int
    model: str


class Choice(BaseModel):
    """What every choice carries: its index and, once it has ended, why."""

    index: int
    finish_reason: FinishReason = None


class CompletionChoice(Choice):
    text: str
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(Envelope):
    """``text_completion``, whole or (in a stream) one chunk; the stream's last chunk may have no choices."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text")


class ToolCallObject(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallObject]] = None


class FunctionFragment(BaseModel):
    name: Optional[str] = None
    arguments: str = Field(description="The next piece of the arguments' JSON text")


class ToolCallFragment(BaseModel):
    """A piece of a streamed call: the first carries ``id``, ``type`` and the function's name."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: FunctionFragment


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionResponse(Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallFragment]] = None


class ChatChunkChoice(Choice):
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionChunk(Envelope):
    """One ``data:`` event of a streamed chat completion."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    root: Optional[str] = Field(None, description="The weights' folder or file (a LoRA adapter's folder)")
    parent: Optional[str] = Field(None, description="A LoRA adapter's base model; null for a base model")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a client needs to tokenize as the server does (lm-evaluation-harness's remote tokenizer)."""

    model_config = {"extra": "allow"}
    tokenizer_class: str
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_token: Optional[str] = None
    add_bos_token: bool
    chat_template: Optional[str] = None
    model_max_length: int
    vocab_size: int


class Health(BaseModel):
    status: Literal["ok"]


ERRORS: dict[Union[int, str], Json] = {
    400: {"model": ErrorResponse, "description": "A bad request: fields, JSON, UTF-8, context length, limits"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when the server has one)"},
    404: {"model": ErrorResponse, "description": "The request names a model this server does not serve"},
    408: {"model": ErrorResponse, "description": "The body did not arrive in time"},
    413: {"model": ErrorResponse, "description": "The body is larger than the server accepts"},
    503: {"model": ErrorResponse, "description": "The waiting queue is full, or the engine is not running"},
}
KEYED = {401: ERRORS[401]}  # what every route behind the API key may answer
BODY_ERRORS = {k: ERRORS[k] for k in (400, 404, 408, 413, 503)}  # and every route that reads a body


def errors(*statuses: int) -> dict[Union[int, str], Json]:
    """The entries of ``ERRORS`` for ``statuses``."""
    return {k: ERRORS[k] for k in statuses}


def body(model: type[BaseModel]) -> Json:
    """``openapi_extra`` declaring a JSON request body of ``model`` (registered for the components)."""
    _declared[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(
        model=model.__name__)}}}}}


def streamed(model: type[BaseModel], chunk: type[BaseModel]) -> Json:
    """A 200 answer that is ``model`` as JSON, or server-sent events of ``chunk`` when ``stream`` is set."""
    return {200: {"model": model, "description": f"{model.__name__}; with stream: true, server-sent events "
                  f"'data: <{chunk.__name__}>' ending with 'data: [DONE]'",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def _with_request_schemas(spec: Json) -> Json:
    """``spec`` with every declared request model (and the models inside it) under components/schemas,
    and without FastAPI's 422 answers (loom answers every invalid request with a 400)."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for name, model in _declared.items():
        schema = model.model_json_schema(ref_template=REF, mode="validation")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return spec


def install_api_description(app: FastAPI, public: bool) -> None:
    """Serve ``/openapi.json`` and ``/docs`` (Swagger UI), behind the API key unless ``public``."""
    def description() -> Json:
        if app.openapi_schema is None:
            app.openapi_schema = _with_request_schemas(get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes))
        return app.openapi_schema

    app.openapi = description  # type: ignore[method-assign]
    dependencies = [] if public else [Depends(authorize)]

    async def openapi_json() -> JSONResponse:
        return JSONResponse(description())

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API")

    app.add_api_route("/openapi.json", openapi_json, include_in_schema=False, dependencies=dependencies)
    app.add_api_route("/docs", docs, include_in_schema=False, dependencies=dependencies)
