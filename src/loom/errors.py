"""Typed errors a request can meet, so that callers (the server, the CLI) map them by type, never by message.

Each subclasses the built-in it refines (ValueError for a bad request, RuntimeError for a busy engine),
so ``except ValueError`` keeps working for code that does not care which.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot run as asked (bad prompt, bad sampling field): HTTP 400."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context: HTTP 400."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (``SchedulerConfig.max_waiting``); try again later: HTTP 503."""


def check_context(prompt_len: int, max_tokens: int | None, context: int) -> int:
    """The number of tokens that may be generated; raises when the request cannot fit."""
    if prompt_len == 0:
        raise InvalidRequestError("the prompt is empty")
    if prompt_len >= context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens")
    room = context - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise ContextLengthError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {context} tokens")
    return max_tokens
