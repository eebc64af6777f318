"""Errors as HTTP answers: the one table from exception type to status and OpenAI error type / code.

Every error a client can meet is an exception class (``loom.errors``, plus the HTTP-only ones below);
``KINDS`` says how each is answered, and the body is OpenAI's
``{"error": {"message", "type", "param", "code"}}``. ``param`` is the exception's ``param`` attribute
(the request field at fault), when it has one. A type is looked up along its MRO, so a subclass
without an entry of its own is answered as its nearest listed base. Anything else is a 500 that
names only the exception's type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loom.errors import (AuthenticationError, ContextLengthError, EngineUnavailableError, InvalidRequestError,
                         ModelNotFoundError, NotFoundError, PayloadTooLargeError, QueueFullError)

log = logging.getLogger("loom.serve")


class MethodNotAllowedError(InvalidRequestError):
    """The route exists, but not for this HTTP method: HTTP 405."""


class RequestTimeoutError(InvalidRequestError):
    """The request body did not arrive in time (a stalled or deliberately slow upload): HTTP 408."""


class ClientDisconnectedError(ConnectionError):
    """The client went away before its answer was ready (nginx's 499; nobody reads the answer)."""


class RequestFailedError(RuntimeError):
    """A request the engine had accepted could not finish (a step failed, or the engine stopped): HTTP 500."""


class ShuttingDownError(EngineUnavailableError):
    """The server is shutting down and its graceful timeout has passed: HTTP 503."""


@dataclass(frozen=True)
class ErrorKind:
    """How one exception type is answered: HTTP status, OpenAI ``error.type`` and ``error.code``, and a
    prefix for the message (the exception's text follows it)."""

    status: int
    type: str
    code: Optional[str] = None
    prefix: str = ""


KINDS: dict[type[BaseException], ErrorKind] = {
    InvalidRequestError: ErrorKind(400, "invalid_request_error"),
    ContextLengthError: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    AuthenticationError: ErrorKind(401, "authentication_error", "invalid_api_key"),
    NotFoundError: ErrorKind(404, "not_found_error"),
    ModelNotFoundError: ErrorKind(404, "not_found_error", "model_not_found"),
    MethodNotAllowedError: ErrorKind(405, "invalid_request_error"),
    RequestTimeoutError: ErrorKind(408, "invalid_request_error", "request_timeout"),
    PayloadTooLargeError: ErrorKind(413, "invalid_request_error", "request_too_large"),
    ClientDisconnectedError: ErrorKind(499, "invalid_request_error"),
    RequestFailedError: ErrorKind(500, "server_error"),
    QueueFullError: ErrorKind(503, "service_unavailable", "queue_full", prefix="the server is busy: "),
    EngineUnavailableError: ErrorKind(503, "service_unavailable"),
}


def kind_of(error: BaseException) -> Optional[ErrorKind]:
    """The entry of ``KINDS`` for the error's type or its nearest listed base; None if it has none."""
    for cls in type(error).__mro__:
        if cls in KINDS:
            return KINDS[cls]
    return None


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_payload(error: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for ``error`` (500 "internal error" if its type has no kind)."""
    kind = kind_of(error)
    if kind is None:
        return 500, error_body(f"internal error: {type(error).__name__}", "server_error")
    return kind.status, error_body(kind.prefix + str(error), kind.type, getattr(error, "param", None), kind.code)


def error_response(error: BaseException) -> JSONResponse:
    """The answer to ``error``: its kind's status and body."""
    status, body = error_payload(error)
    return JSONResponse(body, status_code=status)


async def _known_error(request: Request, error: Exception) -> JSONResponse:
    """The handler for every type in ``KINDS``."""
    return error_response(error)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals: unknown routes (404) and methods (405) as typed errors; any other
    status as an invalid request with Starlette's detail."""
    where = f"no route {request.method} {request.url.path}"
    if error.status_code == 404:
        return error_response(NotFoundError(where))
    if error.status_code == 405:
        return error_response(MethodNotAllowedError(where))
    return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter validation (routes read their bodies themselves): a 400, not a 422."""
    first = (error.errors() or [{}])[0]
    param = ".".join(str(x) for x in first.get("loc", ())) or None
    return error_response(InvalidRequestError(f"{param}: {first.get('msg', 'invalid request')}", param=param))


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    """Anything else: logged with its traceback, answered as a bare 500."""
    log.exception("unexpected error on %s", request.url.path)
    return error_response(error)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every listed error type, Starlette's HTTP errors and anything unexpected as OpenAI does."""
    for cls in KINDS:
        app.add_exception_handler(cls, _known_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
