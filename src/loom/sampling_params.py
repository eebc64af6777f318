"""SamplingParams: how to pick each next token and when to stop (vLLM's names and meanings)."""

from __future__ import annotations

import json as _json
import math
from dataclasses import dataclass, field
from typing import Any

from loom.config import KVPolicyConfig
from loom.errors import InvalidRequestError


MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed takes


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain a completion to a language (engine/structured.py): exactly one of a JSON schema (a dict or
    its JSON text), any JSON object (``json_object``), a regular expression, one of several strings
    (``choice``), or a Lark grammar. vLLM's ``structured_outputs`` / ``guided_*`` and OpenAI's
    ``response_format`` map onto it."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequestError(f"give exactly one kind of structured output, got {given or 'none'}",
                                      param="structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("choice must be a non-empty list of non-empty strings",
                                      param="structured_outputs.choice")

    @property
    def key(self) -> str:
        """A canonical text of the constraint (the grammar cache's key)."""
        value = _json.dumps(self.json, sort_keys=True) if isinstance(self.json, dict) else self.json
        return _json.dumps([value, self.json_object, self.regex, self.choice, self.grammar])


@dataclass
class SamplingParams:
    """Decoding controls for one request.

    Processing order (docs/ALGORITHMS.md, "Sampling"): repetition / frequency / presence penalties ->
    logit_bias -> temperature -> top-k -> top-p -> min-p -> sample. ``temperature == 0`` is greedy.
    """

    n: int = 1  # completions per prompt (they share the prompt's KV blocks)
    max_tokens: int | None = 16  # None: up to the model's context length
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019): l / r if l > 0 else l * r, prompt + output
    presence_penalty: float = 0.0  # OpenAI: l -= presence * [count > 0], output tokens
    frequency_penalty: float = 0.0  # OpenAI: l -= frequency * count, output tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None  # top-N log-probabilities per generated token (plus the chosen one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    kv_policy: KVPolicyConfig | None = None  # KV eviction for this request (None: the engine's policy)
    structured_output: StructuredOutput | None = None  # constrain the text to a schema, regex, choice, grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError (a ValueError) naming the first field of the wrong type or out of its
        range. The server checks requests with this too, so the API and the server accept the same."""

        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}", param=name)

        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise bad(name, "must be an integer")
        for name in ("max_tokens", "logprobs", "prompt_logprobs", "seed"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise bad(name, "must be an integer or None")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", "must be strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be token ids (integers >= 0)")
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise bad("logit_bias", f"keys must be token ids (integers >= 0); {token!r} is not")
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]; "
                                        f"token {token} has {bias!r}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise bad("seed", "must be in [-2**63, 2**64)")
        if not 1 <= self.n <= 128:
            raise bad("n", "must be in [1, 128]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise bad(name, f"must be in [0, {MAX_LOGPROBS}]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if not self.temperature >= 0:
            raise bad("temperature", "must be >= 0")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (or -1 to disable)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise bad("structured_output", "must be a StructuredOutput")
        if self.kv_policy is not None and not isinstance(self.kv_policy, KVPolicyConfig):
            raise bad("kv_policy", "must be a KVPolicyConfig")
        if any(not s for s in self.stop):
            raise bad("stop", "must not contain empty strings")

    def check_vocabulary(self, vocab_size: int) -> None:
        """InvalidRequestError if logit_bias or stop_token_ids name a token outside ``[0, vocab_size)``."""
        for name, tokens in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            outside = [t for t in tokens if t >= vocab_size]
            if outside:
                raise InvalidRequestError(f"{name} names token {outside[0]}, outside the vocabulary "
                                          f"[0, {vocab_size})", param=name)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
