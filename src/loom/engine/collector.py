"""Collecting one request's stream of deltas into its RequestOutput.

The engine reports progress as ``StreamDelta``s (a few tokens of one completion per step); callers
that want whole answers (``LLM.generate``, the server's non-streamed responses) feed every delta of a
request to its ``RequestCollector`` and read ``result()`` once ``done``.
"""

from __future__ import annotations

from loom.engine.sequence import Request
from loom.outputs import CompletionOutput, PositionLogprobs, RequestOutput, StreamDelta, Timings


def timings_of(request: Request, generated: int) -> Timings:
    """The request's time to first token and decode time so far, with its prompt and generated counts."""
    m = request.metrics
    first = m.first_token or m.arrival
    return Timings(prefill=first - m.arrival, decode=(m.last_token or first) - first,
                   prompt_tokens=len(request.prompt_ids), generated_tokens=generated)


class RequestCollector:
    """Accumulates one request's deltas (all ``params.n`` completions) into its RequestOutput."""

    def __init__(self, request: Request) -> None:
        self.request = request
        n = request.params.n
        self.text: list[list[str]] = [[] for _ in range(n)]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[PositionLogprobs]] = [[] for _ in range(n)]
        self.finish: list[tuple[str | None, str | int | None]] = [(None, None)] * n

    def add(self, d: StreamDelta) -> None:
        """Append delta ``d`` to completion ``d.index``; its finish reason, if any, ends that completion."""
        self.text[d.index].append(d.text)
        self.tokens[d.index] += d.token_ids
        if d.logprobs:
            self.logprobs[d.index] += d.logprobs
        if d.finish_reason is not None:
            self.finish[d.index] = (d.finish_reason, d.stop_reason)

    @property
    def done(self) -> bool:
        """Whether every completion has received its finishing delta."""
        return all(f is not None for f, _ in self.finish)

    def result(self) -> RequestOutput:
        """The request's output: each completion's joined text, tokens, finish and stop reasons (and
        logprobs when the request asked for them), its prompt logprobs and its timings."""
        r = self.request
        want_lp = r.params.logprobs is not None
        outputs = [CompletionOutput(i, "".join(self.text[i]), self.tokens[i], *self.finish[i],
                                    logprobs=self.logprobs[i] if want_lp else None) for i in range(r.params.n)]
        return RequestOutput(r.request_id, r.prompt, r.prompt_ids, outputs, True,
                             timings_of(r, sum(len(t) for t in self.tokens)), r.prompt_logprobs)
