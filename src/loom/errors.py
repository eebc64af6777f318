"""Typed errors a request can meet, so that callers (the server, the CLI) map them by type, never by message.

Each subclasses the built-in it refines (ValueError for a bad request, RuntimeError for a busy or stopped
engine, LookupError for a missing thing), so ``except ValueError`` keeps working for code that does not
care which. Request errors carry ``param``, the request field at fault when there is one. The HTTP
status each is answered with is noted here and decided in one place, ``loom.serve.errors``.
"""

from __future__ import annotations

from typing import Optional


class InvalidRequestError(ValueError):
    """A request the engine cannot run as asked (bad prompt, bad sampling field): HTTP 400.

    ``param`` names the field at fault (a class default, or given when raised); None when no one field is.
    """

    param: Optional[str] = None

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class InvalidPromptError(InvalidRequestError):
    """The prompt cannot be run (empty, or token ids outside the vocabulary): HTTP 400, param "prompt"."""

    param = "prompt"


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context: HTTP 400, param "prompt"."""

    param = "prompt"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts: HTTP 413."""


class AuthenticationError(Exception):
    """The request lacks the server's API key, or carries a wrong one: HTTP 401."""


class NotFoundError(LookupError):
    """Something the request names does not exist (a route, a model): HTTP 404."""

    param: Optional[str] = None


class ModelNotFoundError(NotFoundError):
    """The request names a model this server does not serve: HTTP 404, param "model"."""

    param = "model"


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (``SchedulerConfig.max_waiting``); try again later: HTTP 503."""


class EngineUnavailableError(RuntimeError):
    """The engine is not running (it failed, was stopped, or the server is shutting down): HTTP 503."""


class WorkerLostError(EngineUnavailableError):
    """A tensor-parallel rank died, hung past the collective timeout or failed: the ranks are out of step for
    good, the engine cannot continue (the server reports itself unhealthy and exits): HTTP 503."""


def check_context(prompt_len: int, max_tokens: int | None, context: int) -> int:
    """The number of tokens that may be generated; raises when the request cannot fit."""
    if prompt_len == 0:
        raise InvalidPromptError("the prompt is empty")
    if prompt_len >= context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens")
    room = context - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ContextLengthError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {context} tokens")
    return max_tokens
