"""Running the app under uvicorn, with a shutdown that ends cleanly."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    """On SIGTERM / SIGINT: stop accepting, let in-flight requests finish (up to the graceful timeout),
    stop the engine, exit with status 0. Plain uvicorn re-raises the signal after its shutdown, so the
    process would end by dying of it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve(app: FastAPI, host: str, port: int, log_level: str = "info", graceful_timeout: float = 30.0) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT / SIGTERM, then shut down gracefully."""
    GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=graceful_timeout)).run()
