"""Embedding routes: OpenAI's ``POST /v1/embeddings``, rerank (Cohere / Jina's shape, at ``/v1/rerank``,
``/rerank`` and ``/v2/rerank``) and vLLM's ``POST /v1/score``, over the served embedding model.

The embedding model is ``loom serve --embedding-model PATH`` (an encoder such as all-MiniLM-L6-v2) or,
without it, the served chat model itself (its pooled final hidden states, as vLLM embeds with a decoder),
under its own name (``ServerState.embedder``). Rerank and score run a bi-encoder: query and document are
embedded separately and their score is the cosine similarity of the two embeddings, which is what vLLM
answers for an embedding model (a cross-encoder, which reads the pair together, is not served here).

The forward passes run in a one-thread executor of their own (``ServerState.embedding_executor``), never on
the event loop: requests queue there one batch at a time (torch already spreads one batch over the
cores), while the loop goes on serving everything else. Refusals are typed errors (``loom.errors``) that
``serve/errors.py`` answers as OpenAI does: 400 for an empty or too-long input, a bad token id, too many
inputs or an unsupported ``dimensions``; 404 for another model's name.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Annotated, Any, Callable, Literal, Optional, Sequence, TypeVar, Union

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loom.errors import InvalidRequestError, ModelNotFoundError
from loom.serve import openapi as doc
from loom.serve.openai_format import model_card
from loom.serve.state import ServerState, authorize, server_state

State = Annotated[ServerState, Depends(server_state)]
router = APIRouter(dependencies=[Depends(authorize)], responses=doc.KEYED)  # behind the API key, as ``api``
T = TypeVar("T")

TokenIds = list[int]


def one_of(shapes: str) -> Callable[[Any, Any], Any]:
    """A wrap validator for a union field whose failure says, in words, which shapes it takes (pydantic's own
    message names one branch of the union: "input.str: Input should be a valid string")."""

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {shapes}") from None

    return check


# Requests --------------------------------------------------------------------------------------


class EmbeddingRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (OpenAI's fields, and vLLM's ``truncate_prompt_tokens`` and
    ``normalize``)."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    input: Union[str, list[str], TokenIds, list[TokenIds]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    normalize: Optional[bool] = None

    _input = field_validator("input", mode="wrap")(
        one_of("a string, a list of strings, a list of token ids or a list of token id lists"))

    def inputs(self) -> list[Union[str, TokenIds]]:
        """The inputs, each a string or a list of token ids."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [list(x)]  # type: ignore[arg-type]
        return list(x)  # type: ignore[arg-type]


class Document(BaseModel):
    """A document as an object (Cohere's and Jina's ``{"text": ...}``)."""

    model_config = ConfigDict(extra="allow")
    text: str


class RerankRequest(BaseModel):
    """The body of ``POST /v1/rerank`` (and ``/rerank``, ``/v2/rerank``): Cohere's and Jina's fields."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    query: str
    documents: list[Union[str, Document]]
    top_n: Optional[int] = Field(None, ge=1)
    return_documents: bool = True
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)

    _documents = field_validator("documents", mode="wrap")(one_of("a list of strings or of {\"text\": ...} objects"))

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(BaseModel):
    """The body of ``POST /v1/score`` (vLLM's): ``text_1`` is paired with every ``text_2`` when it is one
    text, else the two lists pair up in order."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)

    _texts = field_validator("text_1", "text_2", mode="wrap")(one_of("a string or a list of strings"))

    def sides(self) -> tuple[list[str], list[str]]:
        """(text_1, text_2) as lists that pair up: one text_1 for every text_2, or as many as text_2;
        InvalidRequestError otherwise."""
        left = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        right = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        if not left or not right:
            raise InvalidRequestError("text_1 and text_2 must not be empty", param="text_1" if not left else "text_2")
        if len(left) not in (1, len(right)):
            raise InvalidRequestError(f"text_1 has {len(left)} texts and text_2 {len(right)}: give one text_1, or as "
                                      "many as text_2", param="text_2")
        return left, right


# Responses (the OpenAPI description; the handlers build plain JSON) ---------------------------------


class EmbeddingData(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]  # floats, or base64 of little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """OpenAI's embeddings answer: one vector per input, in input order."""

    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Optional[Document] = None


class RerankResponse(BaseModel):
    """The documents by relevance to the query, highest first (cosine similarity of the embeddings)."""

    id: str
    model: str
    usage: EmbeddingUsage
    results: list[RerankResult]


class ScoreData(BaseModel):
    index: int
    object: Literal["score"]
    score: float


class ScoreResponse(BaseModel):
    """One score per pair, in pair order (cosine similarity of the embeddings)."""

    id: str
    object: Literal["list"]
    created: int
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


# Running the model -----------------------------------------------------------------------------


def check_embedding_model(state: ServerState, name: Optional[str]) -> None:
    """ModelNotFoundError when a request names a model other than the served embedding model (None: any)."""
    if name is not None and name != state.embedding_model_name:
        raise ModelNotFoundError(f"the model {name!r} does not exist (this server embeds with "
                                 f"{state.embedding_model_name!r})")


def check_count(state: ServerState, count: int, param: str) -> None:
    """InvalidRequestError when a request asks for more embeddings than the server allows at once."""
    if count > state.max_embedding_inputs:
        raise InvalidRequestError(f"at most {state.max_embedding_inputs} inputs per request, got {count}", param=param)


def check_texts(texts: Sequence[Any], field: str) -> None:
    """InvalidRequestError for an empty text (OpenAI refuses them too)."""
    for i, t in enumerate(texts):
        if isinstance(t, str) and not t:
            raise InvalidRequestError(f"{field}[{i}] is an empty string; every text must have content", param=field)


async def off_the_loop(state: ServerState, work: Callable[[], T]) -> T:
    """``work()`` in the embedding executor (a model forward must never block the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(state.embedding_executor, work)


def embed_fields(state: ServerState, fields: Sequence[tuple[str, Sequence[Union[str, TokenIds]]]],
                 truncate: Optional[int], **options: Any) -> tuple[list[torch.Tensor], int]:
    """(the embeddings of each field's inputs, the tokens embedded): tokenized field by field, so that an error
    names the field and the input (``documents[3]``), and embedded in one pass. Runs in the executor."""
    ids = [state.embedder.tokenize(inputs, truncate, field) for field, inputs in fields]
    vectors = state.embedder.embed_ids([x for group in ids for x in group], **options)
    return list(vectors.split([len(group) for group in ids])), sum(len(x) for group in ids for x in group)


def encode_vector(vector: torch.Tensor, encoding_format: str) -> Union[list[float], str]:
    """A vector as OpenAI sends it: floats, or base64 of its little-endian float32 bytes (what OpenAI's SDK
    decodes with ``np.frombuffer(base64.b64decode(s), dtype="float32")``)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": tokens, "total_tokens": tokens}


async def cosine_scores(state: ServerState, left: tuple[str, list[str]], right: tuple[str, list[str]],
                        truncate: Optional[int]) -> tuple[list[float], int]:
    """cos(e(left[i]), e(right[i])) for every pair (one left text pairs with every right one), and the tokens
    embedded; ``left`` and ``right`` are (field name, texts)."""
    (a, b), tokens = await off_the_loop(state, lambda: embed_fields(state, [left, right], truncate, normalize=True))
    return (a * b).sum(dim=-1).tolist(), tokens  # unit vectors: the dot product is the cosine


# Routes ----------------------------------------------------------------------------------------


@router.post("/v1/embeddings", response_model=EmbeddingResponse, openapi_extra=doc.body(EmbeddingRequest),
             responses=doc.BODY_ERRORS)
async def create_embeddings(request: Request, state: State) -> JSONResponse:
    """OpenAI's embeddings: a string, a list of strings, token ids or a list of token id lists; vectors as
    floats or base64 (``encoding_format``); ``dimensions`` only for a model trained for truncation."""
    req = await state.read(request, EmbeddingRequest)
    check_embedding_model(state, req.model)
    inputs = req.inputs()
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    check_count(state, len(inputs), "input")
    check_texts(inputs, "input")
    (vectors,), tokens = await off_the_loop(state, lambda: embed_fields(
        state, [("input", inputs)], req.truncate_prompt_tokens, normalize=req.normalize, dimensions=req.dimensions))
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": state.embedding_model_name, "usage": usage(tokens)})


@router.post("/v1/rerank", response_model=RerankResponse, openapi_extra=doc.body(RerankRequest),
             responses=doc.BODY_ERRORS)
@router.post("/v2/rerank", response_model=RerankResponse, openapi_extra=doc.body(RerankRequest),
             responses=doc.BODY_ERRORS)
@router.post("/rerank", response_model=RerankResponse, openapi_extra=doc.body(RerankRequest),
             responses=doc.BODY_ERRORS)
async def rerank(request: Request, state: State) -> JSONResponse:
    """The documents ordered by relevance to the query, highest first (``top_n`` of them); the relevance is
    the cosine similarity of the query's and the document's embeddings (a bi-encoder, as vLLM scores with an
    embedding model)."""
    req = await state.read(request, RerankRequest)
    check_embedding_model(state, req.model)
    texts = req.texts()
    if not texts:
        raise InvalidRequestError("documents must not be empty", param="documents")
    check_count(state, len(texts) + 1, "documents")
    check_texts([req.query], "query")
    check_texts(texts, "documents")
    scores, tokens = await cosine_scores(state, ("query", [req.query]), ("documents", texts),
                                         req.truncate_prompt_tokens)
    ranked = sorted(range(len(texts)), key=lambda i: -scores[i])[:req.top_n]
    results = [{"index": i, "relevance_score": scores[i]} | ({"document": {"text": texts[i]}}
                                                              if req.return_documents else {}) for i in ranked]
    return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": state.embedding_model_name,
                         "usage": usage(tokens), "results": results})


@router.post("/v1/score", response_model=ScoreResponse, openapi_extra=doc.body(ScoreRequest),
             responses=doc.BODY_ERRORS)
async def score(request: Request, state: State) -> JSONResponse:
    """vLLM's score: ``text_1`` against each ``text_2`` (or pairwise), the cosine similarity of their
    embeddings (a bi-encoder, as vLLM scores with an embedding model)."""
    req = await state.read(request, ScoreRequest)
    check_embedding_model(state, req.model)
    left, right = req.sides()
    check_count(state, len(left) + len(right), "text_2")
    check_texts(left, "text_1")
    check_texts(right, "text_2")
    scores, tokens = await cosine_scores(state, ("text_1", left), ("text_2", right), req.truncate_prompt_tokens)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": state.embedding_model_name, "data": data, "usage": usage(tokens)})


def embedding_card(state: ServerState, name: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The ``/v1/models`` card of the embedding model when it is not the chat model (and, given ``name``,
    is named so); None otherwise."""
    own = state.embedding_model_name
    if own == state.model_name or (name is not None and name != own):
        return None
    return model_card(own, state.created, state.embedder.spec.max_tokens)
