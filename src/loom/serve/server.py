"""Running the app under uvicorn, with a shutdown that ends cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from typing import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("loom.serve")

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


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", graceful_timeout: float = 30.0) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT / SIGTERM, then shut down gracefully."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout + FLUSH_S)
    GracefulServer(config, app, graceful_timeout).run()
