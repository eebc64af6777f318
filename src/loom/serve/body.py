"""Reading a request body into one of the protocol's models, with a clear error for every way it is wrong:
too large (413), not UTF-8, not JSON, not an object, or failing validation (400)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from loom.errors import InvalidRequestError, PayloadTooLargeError

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; PayloadTooLargeError as soon as it (or its declared length) exceeds ``limit`` bytes."""
    too_large = PayloadTooLargeError(f"request body is larger than {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict:
    """``raw`` as a JSON object; InvalidRequestError naming where UTF-8 or JSON decoding failed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") \
            from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return data


def validate(model: type[M], data: dict) -> M:
    """``data`` validated as ``model``; the first problem becomes an InvalidRequestError whose ``param``
    is the field's dotted path (unknown fields are named as "unrecognized request argument")."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        elif param:
            message = f"{param}: {message}"
        raise InvalidRequestError(message, param=param) from None


async def read_json(request: Request, model: type[M], limit: int) -> M:
    """The body of ``request``, at most ``limit`` bytes, parsed and validated as ``model``."""
    return validate(model, parse_json_object(await read_body(request, limit)))
