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
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or string), "length", "abort"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    timings: Timings = field(default_factory=Timings)

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
    """One increment of a streamed completion."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
