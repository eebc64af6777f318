"""A tensor-parallel `loom serve` whose worker is killed mid-stream: the client's stream ends with an error (no
hang), /health answers 503, and the server exits non-zero with a clear message within the collective timeout."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

from loom.bench.serve import wait_for_health
from tests.engine.parallel.test_launch import SRC, free_port
from tests.helpers import tiny_llama_folder

TIMEOUT_S = 10


def test_killed_worker_makes_the_server_unhealthy_and_exit(tmp_path):
    tiny_path = tiny_llama_folder(str(tmp_path / "llama"), seed=5)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "loom.cli", "serve", "--model", tiny_path, "--port", str(port),
                             "--tensor-parallel-size", "2", "--tp-timeout", str(TIMEOUT_S), "--kv-cache-memory",
                             "4MiB", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    try:
        wait_for_health(proc, url, timeout_s=120)
        pids = re.search(r"worker pids \[(\d+)\]", "".join(lines))
        assert pids, "".join(lines)
        body = {"model": "llama", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                "ignore_eos": True, "stream": True}
        events: list[str] = []
        start = None
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3 and start is None:  # tokens are flowing: kill the worker
                    os.kill(int(pids.group(1)), signal.SIGKILL)
                    start = time.monotonic()
        assert start is not None and time.monotonic() - start < TIMEOUT_S
        errors = [json.loads(e)["error"] for e in events if e.startswith("{") and "error" in json.loads(e)]
        assert errors and "tensor parallelism failed" in errors[0]["message"], events[-3:]
        statuses = []
        while proc.poll() is None and time.monotonic() - start < TIMEOUT_S + 5:
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert 503 in statuses and 200 not in statuses
        assert proc.wait(TIMEOUT_S) == 1
        out = "".join(lines)
        assert "loom: error: the engine failed and the server stopped: tensor parallelism failed" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
