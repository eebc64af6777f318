"""Between a route and the AsyncEngine: submitting a response's requests (all or none), reading their
deltas back, collecting them into RequestOutputs, and giving up on work whose client has gone."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from loom.engine.collector import RequestCollector
from loom.engine.sequence import Request as EngineRequest
from loom.errors import InvalidRequestError
from loom.outputs import RequestOutput, StreamDelta
from loom.sampling_params import SamplingParams
from loom.serve.async_engine import AsyncEngine
from loom.serve.errors import ClientDisconnectedError, RequestFailedError, ShuttingDownError

T = TypeVar("T")


@dataclass
class Submission:
    """The engine requests of one response (one per prompt, in prompt order) and the queue all their
    deltas arrive on."""

    engine: AsyncEngine
    requests: list[EngineRequest]
    out: asyncio.Queue

    def abort(self) -> None:
        """Withdraw every request (those already finished are ignored by the engine)."""
        for r in self.requests:
            self.engine.abort(r.request_id)


async def submit(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, prefix: str,
                 lora: str | None = None) -> Submission:
    """Queue one request per prompt (ids ``{prefix}-{i}``) on a shared queue, under the LoRA adapter named
    ``lora`` (None: the base model). If the engine refuses any, the ones already queued are withdrawn and
    its error is raised: QueueFullError, EngineUnavailableError, ModelNotFoundError (an adapter unloaded
    meanwhile), an InvalidRequestError (a plain ValueError from ``add_request``, its documented "bad
    request", is raised as one)."""
    sub = Submission(engine, [], asyncio.Queue())
    rid = ""
    try:
        for i, ids in enumerate(prompts):
            rid = f"{prefix}-{i}"
            sub.requests.append(await engine.add(rid, ids, params, sub.out, lora))
    except BaseException as e:
        sub.abort()
        engine.abort(rid)  # in case it was queued after all (a cancelled wait); else a no-op
        if isinstance(e, ValueError) and not isinstance(e, InvalidRequestError):
            raise InvalidRequestError(str(e)) from e
        raise
    return sub


async def deltas(sub: Submission) -> AsyncIterator[tuple[int, StreamDelta]]:
    """(prompt index, delta) until every completion of every request has finished. An error the engine
    sends instead raises RequestFailedError (ShuttingDownError as itself); if the consumer stops early,
    what is left is aborted."""
    index = {r.request_id: i for i, r in enumerate(sub.requests)}
    open_choices = sum(r.params.n for r in sub.requests)
    try:
        while open_choices:
            item = await sub.out.get()
            if isinstance(item, ShuttingDownError):
                raise ShuttingDownError(str(item)) from item
            if isinstance(item, BaseException):
                raise RequestFailedError(str(item)) from item
            if item.finish_reason is not None:
                open_choices -= 1
            yield index[item.request_id], item
    finally:
        if open_choices:
            sub.abort()


async def collect(sub: Submission) -> list[RequestOutput]:
    """Every request's RequestOutput (in prompt order), once all have finished."""
    collectors = [RequestCollector(r) for r in sub.requests]
    async for i, d in deltas(sub):
        collectors[i].add(d)
    return [c.result() for c in collectors]


async def until_disconnect(request: Request, work: Awaitable[T], poll_s: float = 0.25) -> T:
    """Await ``work`` as a task; if the client goes away first, cancel it (which aborts its engine
    requests) and raise ClientDisconnectedError."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ClientDisconnectedError("client disconnected")
