"""What generation returns: vLLM's RequestOutput / CompletionOutput shapes, plus timings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timings:
    """Seconds spent; ``prefill`` is time to the first token (TTFT) after the request started."""

    prefill: float = 0.0
    decode: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes out of the prefill; the decode loop makes the rest.
        n = self.generated_tokens - 1
        return n / self.decode if n > 0 and self.decode > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill if self.prefill > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"prefill_s": self.prefill, "decode_s": self.decode, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class Logprob:
    """log p(token) under the model's raw next-token distribution, its rank (1 = most likely) and text."""

    logprob: float
    rank: int
    decoded_token: str


# One position's alternatives: token id -> Logprob (the chosen token and the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or string), "length", "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[PositionLogprobs] | None = None  # one entry per generated token, when asked for


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    timings: Timings = field(default_factory=Timings)
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first entry None (nothing predicts it)

    # Conveniences for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class StreamDelta:
    """What one engine step added to one completion (completion ``index`` of request ``request_id``)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    request_id: str = ""
    index: int = 0
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # sent once, with the first delta
    prompt_token_ids: list[int] | None = None  # sent once, with the first delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
