"""Prometheus metrics for the server (vLLM's names where they exist).

With per-request LoRA adapters (``engine/adapters.py``) also: ``loom_lora_requests_total{lora_name}``
(requests received per adapter), ``loom_lora_active_adapters`` (adapters in use by running sequences),
``loom_lora_loaded_adapters``, and vLLM's ``lora_requests_info`` as ``loom_lora_requests_info`` (labels
``running_lora_adapters`` and ``waiting_lora_adapters``, comma-separated names, and ``max_lora``; its value
is the time of the scrape).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loom.engine.engine import LLMEngine
from loom.engine.sequence import Request
from loom.serve.async_engine import AdapterActivity

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """The server's Prometheus registry: request counters and latency histograms fed as requests finish,
    engine gauges (queues, KV blocks, prefix cache, speculation) read when scraped."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge("loom_num_requests_running", "Sequences running in the engine", labels, registry=r)
        self.waiting = Gauge("loom_num_requests_waiting", "Sequences waiting to be scheduled", labels, registry=r)
        self.kv_used = Gauge("loom_kv_cache_blocks_used", "KV cache blocks in use", labels, registry=r)
        self.kv_total = Gauge("loom_kv_cache_blocks_total", "KV cache blocks in all", labels, registry=r)
        self.kv_usage = Gauge("loom_kv_cache_usage_perc", "Fraction of KV cache blocks in use", labels, registry=r)
        self.prefix_hit = Gauge("loom_prefix_cache_hit_rate", "Prompt blocks found in the prefix cache / looked up",
                                labels, registry=r)
        self.preemptions = Gauge("loom_num_preemptions_total", "Sequences preempted so far", labels, registry=r)
        self.prompt_tokens = Counter("loom_prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self.generation_tokens = Counter("loom_generation_tokens", "Generated tokens of finished requests", labels,
                                         registry=r)
        self.requests = Counter("loom_request_success", "Requests finished", labels + ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("loom_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loom_time_per_output_token_seconds", "Mean time per output token after the first",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loom_e2e_request_latency_seconds", "Arrival to last token", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.spec_drafts = Gauge("loom_spec_decode_num_draft_tokens", "Draft tokens proposed and verified",
                                 labels, registry=r)
        self.spec_accepted = Gauge("loom_spec_decode_num_accepted_tokens", "Draft tokens accepted", labels,
                                   registry=r)
        self.spec_acceptance = Gauge("loom_spec_decode_acceptance_rate",
                                     "Accepted drafts / drafts evaluated (the per-position a)", labels, registry=r)
        self.spec_per_pass = Gauge("loom_spec_decode_tokens_per_pass", "Tokens emitted per target verification pass",
                                   labels, registry=r)
        self.spec_expected = Gauge("loom_spec_decode_expected_tokens_per_pass",
                                   "(1 - a^(k+1)) / (1 - a) at the measured a", labels, registry=r)
        self.spec_speedup = Gauge("loom_spec_decode_speedup",
                                  "Decode tokens/s of steps verifying drafts / of steps without drafts", labels,
                                  registry=r)
        self.model = model_name
        self.lora = engine.adapters is not None
        if self.lora:
            self.lora_requests = Counter("loom_lora_requests", "Requests received per LoRA adapter",
                                         labels + ["lora_name"], registry=r)
            self.lora_active = Gauge("loom_lora_active_adapters", "LoRA adapters in use by running sequences",
                                     labels, registry=r)
            self.lora_loaded = Gauge("loom_lora_loaded_adapters", "LoRA adapters loaded (requests may name them)",
                                     labels, registry=r)
            self.lora_info = Gauge("loom_lora_requests_info",
                                   "Adapters of running and waiting sequences (vLLM's lora_requests_info); the "
                                   "value is the time of the scrape",
                                   labels + ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
            self._lora_counted: dict[str, int] = {}  # what lora_requests holds, per adapter

    def request_finished(self, request: Request) -> None:
        """Called from the engine thread when all of a request's completions have ended."""
        m, label = request.metrics, self.model
        generated = sum(s.num_output for s in request.seqs)
        self.prompt_tokens.labels(label).inc(len(request.prompt_ids))
        self.generation_tokens.labels(label).inc(generated)
        for s in request.seqs:
            self.requests.labels(label, s.finish_reason or "unknown").inc()
        if m.first_token is not None:
            self.ttft.labels(label).observe(m.first_token - m.arrival)
            per_seq = max(1, generated // max(1, len(request.seqs)))
            if per_seq > 1 and m.last_token is not None:
                self.tpot.labels(label).observe((m.last_token - m.first_token) / (per_seq - 1))
        if m.finished is not None:
            self.e2e.labels(label).observe(m.finished - m.arrival)

    def render(self, adapters: AdapterActivity | None = None) -> bytes:
        """Refresh the engine gauges from ``engine.stats()`` (and the adapter metrics from ``adapters``, what
        the engine thread last published) and return the text exposition."""
        s = self.engine.stats()
        label = self.model
        if self.lora:
            self._render_lora(adapters or AdapterActivity())
        self.running.labels(label).set(s.num_running)
        self.waiting.labels(label).set(s.num_waiting)
        self.kv_used.labels(label).set(s.kv_blocks_used)
        self.kv_total.labels(label).set(s.kv_blocks_total)
        self.kv_usage.labels(label).set(s.kv_blocks_used / s.kv_blocks_total)
        self.prefix_hit.labels(label).set(s.prefix_cache_hit_rate)
        self.preemptions.labels(label).set(s.num_preemptions)
        if s.speculative is not None:
            spec = s.speculative
            self.spec_drafts.labels(label).set(spec.draft_tokens)
            self.spec_accepted.labels(label).set(spec.accepted_tokens)
            self.spec_acceptance.labels(label).set(spec.acceptance_rate)
            self.spec_per_pass.labels(label).set(spec.tokens_per_pass)
            self.spec_expected.labels(label).set(spec.expected_tokens_per_pass)
            if spec.speedup is not None:
                self.spec_speedup.labels(label).set(spec.speedup)
        return generate_latest(self.registry)

    def _render_lora(self, activity: AdapterActivity) -> None:
        label, pool = self.model, self.engine.adapters
        received = dict(self.engine.lora_requests)  # a copy at once: the engine thread adds to it
        for name in list(pool.registered):  # type: ignore[union-attr]
            self.lora_requests.labels(label, name)  # a loaded adapter shows 0 before its first request
        for name, count in received.items():
            done = self._lora_counted.get(name, 0)
            if count > done:
                self.lora_requests.labels(label, name).inc(count - done)
                self._lora_counted[name] = count
        self.lora_active.labels(label).set(len(activity.running))
        self.lora_loaded.labels(label).set(len(pool.registered))  # type: ignore[union-attr]
        self.lora_info.clear()  # one sample: the adapters now
        self.lora_info.labels(label, ",".join(activity.running), ",".join(activity.waiting),
                              str(pool.config.max_loras)).set(time.time())  # type: ignore[union-attr]
