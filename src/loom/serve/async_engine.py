"""The engine loop in a background thread, bridged to asyncio.

HTTP handlers run on the event loop; ``LLMEngine`` runs in one thread of its own (torch releases the
GIL inside its kernels, so the loop stays responsive while a step computes). Handlers send commands
(add, abort, and ``call``: any other change to the engine, such as loading or unloading a LoRA adapter)
through a queue; the engine thread applies them between steps, never during one, and pushes every
delta to the asyncio queue of the request it belongs to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from loom.engine.engine import LLMEngine
from loom.engine.sequence import Request
from loom.errors import EngineUnavailableError, ModelNotFoundError, WorkerLostError
from loom.outputs import StreamDelta
from loom.sampling_params import SamplingParams
from loom.serve.errors import ShuttingDownError

log = logging.getLogger("loom.serve")


@dataclass
class _Stream:
    """Where one request's deltas go: its event loop and queue, and the completions still open."""

    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    request: Request
    open: set[int] = field(default_factory=set)  # completion indices not finished yet


@dataclass(frozen=True)
class AdapterActivity:
    """Which LoRA adapters the engine's sequences use, as of the last step or command (read by /metrics
    from the event loop; the engine thread replaces it whole, never changes it)."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    """On the event loop: put each item on its queue."""
    for queue_, item in items:
        queue_.put_nowait(item)


class AsyncEngine:
    """Runs ``engine`` in a thread of its own and routes each request's deltas to its asyncio queue;
    ``on_finished(request)`` is called (in that thread) when a request ends other than by abort."""

    def __init__(self, engine: LLMEngine, on_finished: Callable[[Request], None] | None = None) -> None:
        self.engine = engine
        self.on_finished = on_finished
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None
        self.adapter_activity = AdapterActivity()

    # Lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._run, name="loom-engine", daemon=True)
        self._thread.start()

    def end_in_flight(self) -> None:
        """Stop accepting requests, and end those in flight with ShuttingDownError (from the engine
        thread, between steps); the thread then exits."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running and end the engine thread."""
        self.end_in_flight()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_in_flight(self) -> int:
        """Requests accepted whose completions have not all ended."""
        return len(self._streams)

    # Requests (called from the event loop) -----------------------------------------------------

    async def add(self, request_id: str, prompt: Sequence[int], params: SamplingParams,
                  out: asyncio.Queue, lora: str | None = None) -> Request:
        """Queue a request whose deltas (or, if the engine fails, an EngineUnavailableError) will arrive on
        ``out``; returns the engine's Request once accepted. ``lora``: the LoRA adapter it runs under (None:
        the base model). Raises what add_request raises (ValueError for a bad request, QueueFullError)
        before anything is streamed, ModelNotFoundError for an adapter not loaded (or unloaded since the
        route checked it), and EngineUnavailableError when the engine is not running."""
        if self.dead is not None or self._stopping:
            raise EngineUnavailableError("the engine is not running")
        loop = asyncio.get_running_loop()
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", request_id, list(prompt), params, loop, out, accepted, lora))
        self._wake.set()
        return await asyncio.wrap_future(accepted)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """``fn(engine)`` run in the engine thread between steps (so it never races a step or an
        ``add_request``); its result, or its exception raised here. EngineUnavailableError when the
        engine is not running."""
        if self.dead is not None or self._stopping:
            raise EngineUnavailableError("the engine is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, done))
        self._wake.set()
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        """Abort a request between steps (a no-op for one that has ended or was never accepted)."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    # The engine thread -------------------------------------------------------------------------

    def _apply(self, command: tuple[Any, ...]) -> None:
        if command[0] == "add":
            _, rid, prompt, params, loop, out, accepted, lora = command
            try:
                if lora is not None and lora not in [a.name for a in self.engine.list_loras()]:
                    raise ModelNotFoundError(f"the model {lora!r} does not exist (no LoRA adapter of that name is "
                                             "loaded)")  # unloaded since the route checked the name
                self.engine.add_request(rid, prompt, params, lora=lora)
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                accepted.set_exception(e)
                return
            request = self.engine.requests[rid]
            self._streams[rid] = _Stream(loop, out, request, set(range(params.n)))
            accepted.set_result(request)
        elif command[0] == "abort":
            rid = command[1]
            if rid in self._streams:
                self.engine.abort_request(rid)  # its "abort" deltas go out with the next step
        elif command[0] == "call":
            _, fn, done = command
            try:
                result = fn(self.engine)
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                done.set_exception(e)
            else:
                done.set_result(result)

    def _note_adapters(self) -> None:
        """Publish which adapters running and waiting sequences use (only with per-request adapters)."""
        if self.engine.adapters is None:
            return
        scheduler = self.engine.scheduler
        waiting = {s.adapter.name for s in scheduler.waiting if s.adapter is not None}
        self.adapter_activity = AdapterActivity(tuple(self.engine.adapters.active), tuple(sorted(waiting)))

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        """Hand a step's deltas to their requests' queues: one wake-up per event loop per step, not one
        per delta (each wake-up makes the loop thread contend for the GIL with this one)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StreamDelta]]] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            if delta.finish_reason is not None:
                stream.open.discard(delta.index)
            batches.setdefault(stream.loop, []).append((stream.out, delta))
            if not stream.open:
                del self._streams[delta.request_id]
                if self.on_finished is not None and delta.finish_reason != "abort":
                    self.on_finished(stream.request)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            stream.loop.call_soon_threadsafe(stream.out.put_nowait, error)
            if rid in self.engine.requests:
                self.engine.abort_request(rid)
        self._streams.clear()

    def _drain_aborts(self) -> None:
        """After a failed step: let the engine settle the aborts (frees their blocks)."""
        try:
            while self.engine.has_unfinished_requests() and not self.engine.requests:
                self.engine.step()
        except Exception:  # noqa: BLE001
            log.exception("the engine could not recover; stopping it")
            raise

    def _run(self) -> None:
        try:
            while True:
                applied = False
                while True:
                    try:
                        self._apply(self._commands.get_nowait())
                        applied = True
                    except queue.Empty:
                        break
                if applied:
                    self._note_adapters()
                if self._stopping:  # every request still open is answered with the shutdown error
                    self._fail_all(ShuttingDownError("the server is shutting down"))
                    if self.engine.has_unfinished_requests():
                        self.engine.step()  # settles the aborts, freeing their blocks
                    return
                problem = self.engine.health_problem()
                if problem is not None:  # e.g. a tensor-parallel worker died between requests
                    raise WorkerLostError(problem)
                if self.engine.has_unfinished_requests():
                    try:
                        deltas = self.engine.step()
                    except WorkerLostError:
                        raise  # the engine cannot continue: the loop ends, the server reports it and exits
                    except Exception as e:  # noqa: BLE001 - fail what was in flight, keep serving
                        log.exception("an engine step failed; aborting the requests in flight")
                        self._fail_all(EngineUnavailableError(f"the engine step failed: {e}"))
                        self._drain_aborts()
                        self._note_adapters()
                        continue
                    self._deliver(deltas)
                    self._note_adapters()
                else:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - a broken engine must not hang its clients
            log.exception("the engine loop failed")
            self.dead = e
            self._fail_all(EngineUnavailableError(f"the engine failed: {e}"))
