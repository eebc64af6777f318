"""A live loom server on 127.0.0.1 (uvicorn in a thread), serving the default model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import uvicorn

from loom.bench.serve import wait_for_health
from loom.config import CacheConfig, SchedulerConfig
from loom.llm import LLM
from loom.serve.app import create_app

API_KEY = "test-key"
MODEL = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def engine(self):
        return self.app.state.loom.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(api_key: str | None = API_KEY, max_waiting: int | None = None, memory: str = "256MiB",
                 speculative=None, body_timeout_s: float = 3.0) -> LiveServer:
    from loom.config import parse_bytes

    llm = LLM(cache=CacheConfig(memory_bytes=parse_bytes(memory)),
              scheduler=SchedulerConfig(max_num_seqs=32, max_waiting=max_waiting), speculative=speculative)
    return serve_app(create_app(llm.engine, llm.tokenizer, MODEL, api_key=api_key, max_request_bytes=1 << 20,
                                body_timeout_s=body_timeout_s))


def serve_app(app) -> LiveServer:  # type: ignore[no-untyped-def]
    """``app`` served by uvicorn in a thread on a free local port, once it has started."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    return LiveServer(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="session")
def live():
    s = start_server()
    yield s
    s.stop()


@pytest.fixture()
def client(live):
    import openai

    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def start_cli_server(*options: str) -> tuple[subprocess.Popen, str]:
    """``loom serve`` in a process of its own (the default model as MODEL), once /health answers; returns
    the process (stdout and stderr merged, as text) and its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loom.cli", "serve", "--port", str(port),
                             "--served-model-name", MODEL, *options], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"), text=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, timeout_s=120)
    return proc, url
