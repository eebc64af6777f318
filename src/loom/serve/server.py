"""Running the app under uvicorn, with a shutdown that ends cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from typing import Iterator

import uvicorn
from fastapi import FastAPI

from loom.errors import WorkerLostError

log = logging.getLogger("loom.serve")

UNHEALTHY_LINGER_S = 1.0  # after the engine failed for good: /health answers 503 this long before the server exits
FLUSH_S = 10.0  # after the graceful timeout: time for the ended requests' last bytes to go out


class GracefulServer(uvicorn.Server):
    """On SIGTERM / SIGINT: stop accepting, let in-flight requests finish for up to ``graceful_timeout``
    seconds, then end the ones still running (each stream with an error event and ``[DONE]``, each plain
    request with a 503), stop the engine and exit with status 0. Plain uvicorn cancels the stragglers'
    tasks instead (cut streams, tracebacks) and re-raises the signal after its shutdown, so the process
    would end by dying of it."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, graceful_timeout: float) -> None:
        super().__init__(config)
        self.loom_app = app
        self.graceful_timeout = graceful_timeout

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    async def _end_stragglers(self) -> None:
        await asyncio.sleep(self.graceful_timeout)
        engine = self.loom_app.state.loom.async_engine
        if engine.num_in_flight:
            log.warning("shutdown: %d request(s) still running after the graceful timeout (%g s) end with 503",
                        engine.num_in_flight, self.graceful_timeout)
        engine.end_in_flight()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ender = asyncio.ensure_future(self._end_stragglers())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()


def _watch_engine(server: GracefulServer, failed: list[str], poll_s: float = 0.2) -> None:
    """End the server when its engine can no longer run (``WorkerLostError``: a tensor-parallel rank died or
    hung): after ``UNHEALTHY_LINGER_S`` (/health answers 503 meanwhile) it stops, and ``serve`` returns 1."""
    state = server.loom_app.state.loom
    while not server.should_exit:
        dead = state.async_engine.dead
        if isinstance(dead, WorkerLostError) or (dead is None and state.engine.health_problem() is not None):
            message = str(dead) if dead is not None else state.engine.health_problem()
            failed.append(message)
            log.critical("the engine cannot continue, the server exits: %s", message)
            time.sleep(UNHEALTHY_LINGER_S)
            server.should_exit = True
            return
        time.sleep(poll_s)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", graceful_timeout: float = 30.0) -> int:
    """Serve ``app`` on ``host:port`` until SIGINT / SIGTERM, then shut down gracefully: exit status 0; or until
    the engine fails for good (a lost tensor-parallel rank): the message on stderr and exit status 1."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout + FLUSH_S)
    server = GracefulServer(config, app, graceful_timeout)
    failed: list[str] = []
    threading.Thread(target=_watch_engine, args=(server, failed), name="loom-engine-watch", daemon=True).start()
    server.run()
    if failed:
        print(f"loom: error: the engine failed and the server stopped: {failed[0]}", file=sys.stderr)
        return 1
    return 0
