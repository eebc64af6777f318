"""Reading a request body into one of the protocol's models, with a clear error for every way it is wrong:
too large (413), too slow to arrive (408), not UTF-8, not JSON (RFC 8259: no NaN or Infinity), nested too
deeply, holding a lone surrogate, not an object, or failing validation (400). Fields the models do not
know are ignored with a logged warning, as vLLM does, so clients that send extra fields by default work."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from loom.errors import InvalidRequestError, PayloadTooLargeError
from loom.serve.errors import RequestTimeoutError

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("loom.serve")

MAX_DEPTH = 64  # of nested arrays and objects; OpenAI's request shapes need fewer than 10


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The raw body; PayloadTooLargeError as soon as it (or its declared length) exceeds ``limit`` bytes,
    RequestTimeoutError if all of it has not arrived ``timeout_s`` seconds after the headers."""
    too_large = PayloadTooLargeError(f"request body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stream = request.stream().__aiter__()
    while True:
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            chunk = await asyncio.wait_for(stream.__anext__(), left)
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request body did not arrive within {timeout_s:g} s") from None
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)


def _refuse_constant(name: str) -> Any:
    raise InvalidRequestError(f"request body is not valid JSON: {name} is not a JSON number")


def check_json_value(data: Any, max_depth: int = MAX_DEPTH) -> None:
    """InvalidRequestError if ``data`` nests deeper than ``max_depth`` or holds a string (key or value) that
    is not valid Unicode: a lone UTF-16 surrogate such as ``"\ud800"``, which JSON's escapes can spell.
    Walks iteratively, so no depth reaches Python's recursion limit."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise InvalidRequestError(f"request body is nested more than {max_depth} levels deep")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequestError(f"request body holds a string that is not valid Unicode "
                                          f"(lone surrogate {value[e.start]!a})") from None


def parse_json_object(raw: bytes) -> dict:
    """``raw`` as a JSON object; InvalidRequestError naming where UTF-8 or JSON decoding failed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    except RecursionError:
        raise InvalidRequestError(f"request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:  # e.g. an integer of more digits than int() converts (sys.get_int_max_str_digits)
        if isinstance(e, InvalidRequestError):
            raise
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    check_json_value(data)
    return data


def ignored_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields in ``model`` (and the models inside it) that no model declares."""
    out = [prefix + name for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, list):
            inner = [(f"{prefix}{name}.{i}.", v) for i, v in enumerate(value)]
        else:
            inner = [(f"{prefix}{name}.", value)]
        out += [f for where, v in inner if isinstance(v, BaseModel) for f in ignored_fields(v, where)]
    return out


def validate(model: type[M], data: dict) -> M:
    """``data`` validated as ``model``; the first problem becomes an InvalidRequestError whose ``param``
    is the field's dotted path. Unknown fields are ignored and named in one logged warning."""
    try:
        parsed = model.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        raise InvalidRequestError(message, param=param) from None
    extra = ignored_fields(parsed)
    if extra:
        log.warning("ignoring request fields loom does not use: %s", ", ".join(extra))
    return parsed


async def read_json(request: Request, model: type[M], limit: int, timeout_s: float | None = None) -> M:
    """The body of ``request``, at most ``limit`` bytes arriving within ``timeout_s``, parsed and validated
    as ``model``."""
    return validate(model, parse_json_object(await read_body(request, limit, timeout_s)))
