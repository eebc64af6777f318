"""`loom bench serve`: a load generator against a live `loom serve`, with vLLM's latency definitions,
and the offline engine on the same workload from the same run.

- TTFT: request sent -> first streamed token.  TPOT: (end-to-end - TTFT) / (output tokens - 1).
- ITL: the gap between consecutive streamed tokens.  E2E: request sent -> last byte.
Each is reported as mean, p50 and p99. ``concurrency`` clients each send their next request as soon
as their previous one ends; the offline engine gets the same requests all at once with
``max_num_seqs = concurrency``, which is the same load without HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from loom.bench.throughput import random_prompts


@dataclass
class RequestTiming:
    start: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    end: float = 0.0
    output_tokens: int = 0
    ok: bool = False


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(ordered), "p50": statistics.median(ordered), "p99": p99}


async def _one(client, url: str, model: str, prompt: list[int], output_len: int, api_key: str | None) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "min_tokens": output_len,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t = RequestTiming(time.perf_counter())
    async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            t.end = time.perf_counter()
            return t
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                t.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                if t.first is None:
                    t.first = now
                t.chunks.append(now)
    t.end = time.perf_counter()
    t.ok = t.first is not None
    return t


async def run_load(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                   api_key: str | None = None) -> tuple[list[RequestTiming], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    timings: list[RequestTiming] = []

    async def worker(client):
        while not queue.empty():
            prompt = queue.get_nowait()
            timings.append(await _one(client, url, model, prompt, output_len, api_key))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return timings, time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--port", str(port), "--served-model-name", "bench",
           "--log-level", "warning"] + (["--model", model] if model else []) + extra
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_health(proc, f"http://127.0.0.1:{port}")
    return proc


def wait_for_health(proc: subprocess.Popen, url: str, timeout_s: float = 300.0) -> None:
    """Return once ``url``/health answers 200; RuntimeError (with the end of the server's output) if the
    process exits first, or (killing it) after ``timeout_s``."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            output = proc.stderr if proc.stderr is not None else proc.stdout
            raise RuntimeError(f"the server exited: {output.read()[-2000:] if output else ''}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not come up in {timeout_s:g} s")
        time.sleep(0.25)


def _http_summary(timings: list[RequestTiming], elapsed: float, input_len: int) -> dict[str, Any]:
    ok = [t for t in timings if t.ok]
    out_tokens = sum(t.output_tokens for t in ok)
    ttft = [t.first - t.start for t in ok]
    e2e = [t.end - t.start for t in ok]
    tpot = [(t.end - t.first) / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]
    itl = [b - a for t in ok for a, b in zip(t.chunks, t.chunks[1:])]
    return {"elapsed_s": elapsed, "completed": len(ok), "failed": len(timings) - len(ok),
            "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (out_tokens + input_len * len(ok)) / elapsed,
            "ttft_s": _summary(ttft), "tpot_s": _summary(tpot), "itl_s": _summary(itl), "e2e_s": _summary(e2e)}


def run_serve_bench(model: str | None = None, *, concurrency: int = 16, num_prompts: int = 64, input_len: int = 128,
                    output_len: int = 128, kv_cache_memory: str = "2GiB", offline: bool = True, repeats: int = 2,
                    seed: int = 0) -> dict[str, Any]:
    """HTTP and offline runs alternate (offline, http, offline, http, ...) and the best of each is kept:
    this machine's speed drifts by +-20% over minutes, which would otherwise decide the comparison."""
    from loom.bench.throughput import run_loom
    from loom.config import CacheConfig, SchedulerConfig, parse_bytes
    from loom.llm import LLM

    if min(concurrency, num_prompts, input_len, output_len, repeats) < 1:
        raise ValueError("--concurrency, --num-prompts, --input-len, --output-len and --repeats must be >= 1")
    llm = LLM(model, cache=CacheConfig(memory_bytes=parse_bytes(kv_cache_memory)),
              scheduler=SchedulerConfig(max_num_seqs=concurrency))
    special = tuple(llm.tokenizer.eos_token_ids) + ((llm.tokenizer.bos_token_id,) if llm.tokenizer.bos_token_id
                                                     is not None else ())
    prompts = random_prompts(num_prompts, input_len, llm.config.vocab_size, seed, avoid=special)
    warm = prompts[: min(4, len(prompts))]
    if offline:
        run_loom(llm, warm, 4)
    port = _free_port()
    proc = start_server(model, port, ["--kv-cache-memory", kv_cache_memory, "--max-num-seqs", str(concurrency)])
    url = f"http://127.0.0.1:{port}"
    http_runs: list[dict[str, Any]] = []
    offline_runs: list[dict[str, Any]] = []
    try:
        asyncio.run(run_load(url, "bench", warm, 4, min(4, concurrency)))
        for _ in range(repeats):
            if offline:
                off = run_loom(llm, prompts, output_len)
                offline_runs.append({k: off[k] for k in ("elapsed_s", "requests_per_s", "output_tokens_per_s",
                                                         "total_tokens_per_s")})
            timings, elapsed = asyncio.run(run_load(url, "bench", prompts, output_len, concurrency))
            http_runs.append(_http_summary(timings, elapsed, input_len))
    finally:
        proc.terminate()
        proc.wait(60)
    best = lambda runs: max(runs, key=lambda r: r["output_tokens_per_s"])  # noqa: E731
    results: dict[str, Any] = {"http": {**best(http_runs),
                                        "output_tokens_per_s_runs": [r["output_tokens_per_s"] for r in http_runs]}}
    ratio = None
    if offline:
        results["offline"] = {**best(offline_runs),
                              "output_tokens_per_s_runs": [r["output_tokens_per_s"] for r in offline_runs]}
        ratio = results["http"]["output_tokens_per_s"] / results["offline"]["output_tokens_per_s"]
    return {"benchmark": "serve", "model": model or "default", "concurrency": concurrency,
            "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "repeats": repeats,
            "decode_steps": llm.engine.runner.describe_steps(),
            "results": results, "http_over_offline": ratio, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
