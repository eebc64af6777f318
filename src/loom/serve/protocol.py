"""OpenAI API request shapes (pydantic), and how they become SamplingParams.

Fields follow OpenAI's API reference; the extras other engines accept (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, chat_template_kwargs,
stream_options.continuous_usage_stats) are accepted too. Fields no model here declares (``metadata``,
``store``, ``service_tier``, ... which real clients send by default) are kept as extras, and the server
logs that it ignored them, as vLLM does. Limits that depend on the server (prompts per request, stop
strings) are ``RequestLimits``, checked by ``check_limits``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loom.errors import InvalidRequestError
from loom.sampling_params import MAX_LOGPROBS, SEED_RANGE, SamplingParams, StructuredOutput
from loom.serve.tools import Tool, ToolChoice, check_tools, generic_messages, template_messages, tool_grammar


TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # a logit_bias key: a token id in decimal ASCII digits


@dataclass(frozen=True)
class RequestLimits:
    """Per-request work bounds a server sets (``loom serve --max-prompts-per-request`` ...); each excess is
    a 400 that names the limit."""

    max_prompts: int = 256  # prompts in one /v1/completions request
    max_stop_strings: int = 16
    max_stop_chars: int = 4096  # the stop strings' total length


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage; ``continuous_usage_stats``
    (vLLM's, sent by guidellm) puts the usage so far in every chunk."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False


ONE_CONSTRAINT = "give one structured output (structured_outputs, guided_*, response_format)"


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of a JSON schema, a regex, a choice, a Lark grammar, or
    any JSON object."""

    model_config = ConfigDict(extra="allow")
    json_: Optional[Union[dict[str, Any], str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    n: int = Field(1, ge=1, le=128)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # Extras (vLLM, llama.cpp server)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Optional[Union[dict[str, Any], str]] = None  # vLLM's older names for structured_outputs
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if any(not s for s in ([v] if isinstance(v, str) else (v or []))):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: Any) -> Any:
        for key, value in (v or {}).items():
            if not TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids (decimal digits), got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return v

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def continuous_usage(self) -> bool:
        """Whether every stream chunk carries the usage so far."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def structured_output(self) -> StructuredOutput | None:
        """The constraint on the text (InvalidRequestError if more than one is given)."""
        found = []
        so = self.structured_outputs
        if so is not None:
            found.append(StructuredOutput(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                          json_object=bool(so.json_object)))
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        found += [StructuredOutput(**{k: v}) for k, v in guided.items() if v is not None]
        if len(found) > 1:
            raise InvalidRequestError(ONE_CONSTRAINT,
                                      param="structured_outputs")
        return found[0] if found else None

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, vocab_size: int | None = None) -> SamplingParams:
        """The engine's SamplingParams for these fields (unset temperature / top_p: 1.0). Raises
        InvalidRequestError for what SamplingParams refuses, or a token outside ``[0, vocab_size)``."""
        params = SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            stop=self.stop or [], stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, structured_output=self.structured_output())
        if vocab_size is not None:
            params.check_vocabulary(vocab_size)
        return params


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 is allowed only with echo)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    """A text part of a message's content."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    """A call's function in an assistant message: its name and its arguments as a JSON string."""

    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str


class ToolCall(BaseModel):
    """One of an assistant message's ``tool_calls``."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One chat message; its content is a string or a list of text parts. An assistant message may carry
    ``tool_calls``; a ``tool`` message answers one of them (``tool_call_id``)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The content as one string (parts joined; none: empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates take it ("developer" becomes "system")."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must follow (always enforced, ``strict`` or not)."""

    model_config = ConfigDict(extra="allow")
    name: str = "response"
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(BaseModel):
    """``response_format``: text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.type == "json_schema":
            return StructuredOutput(json=self.json_schema.schema_)  # type: ignore[union-attr]
        return None


class ChatCompletionRequest(SamplingFields):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None  # extra variables for the chat template

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice is only allowed when tools are given")
        reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & set(self.chat_template_kwargs or {})
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)[0]!r}")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def chat_messages(self, template_knows_tools: bool = False) -> list[dict[str, Any]]:
        """The messages as the chat template takes them ("developer" becomes "system"): with tools in play
        and a template that does not render them, in the generic format of ``loom.serve.tools``."""
        messages = [m.as_dict() for m in self.messages]
        self._check_tool_results()
        in_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if template_knows_tools:
            return template_messages(messages) if in_history else messages
        if self.tools or in_history:
            return generic_messages(messages, self.tools)
        return messages

    def template_kwargs(self, template_knows_tools: bool) -> dict[str, Any]:
        """Variables for the chat template: ``chat_template_kwargs``, and ``tools`` for a template that
        renders them."""
        extra = dict(self.chat_template_kwargs or {})
        if template_knows_tools and self.tools:
            extra["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return extra

    def _check_tool_results(self) -> None:
        """InvalidRequestError for a tool message that answers no earlier call (as OpenAI refuses it)."""
        called: set[str] = set()
        for i, m in enumerate(self.messages):
            called.update(c.id for c in m.tool_calls or [])
            if m.role == "tool" and m.tool_call_id not in called:
                raise InvalidRequestError(f"messages[{i}] answers the tool call {m.tool_call_id!r}, which no earlier "
                                          "assistant message made", param="messages")

    @property
    def calls_tools(self) -> bool:
        """Whether the answer is parsed for tool calls (tools given, and ``tool_choice`` is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def structured_output(self) -> StructuredOutput | None:
        """``response_format``, or vLLM's fields (one of them); with tools, the tool-call grammar around it."""
        extra = super().structured_output()
        fmt = self.response_format.structured_output() if self.response_format is not None else None
        if fmt is not None and extra is not None:
            raise InvalidRequestError(ONE_CONSTRAINT,
                                      param="response_format")
        answer = fmt or extra
        if not self.tools:
            return answer
        check_tools(self.tools, self.tool_choice)
        parallel = self.parallel_tool_calls is not False
        return tool_grammar(self.tools, self.tool_choice or "auto", parallel, answer)

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens``, else ``max_tokens`` (None: up to the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    """The body of ``POST /tokenize``: a prompt or chat messages."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """The body of ``POST /detokenize``."""

    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    tokens: list[int]


class LoadLoraAdapterRequest(BaseModel):
    """The body of ``POST /v1/load_lora_adapter`` (vLLM's): a name for requests to use as ``model``, and
    the PEFT adapter folder on the server."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(BaseModel):
    """The body of ``POST /v1/unload_lora_adapter`` (vLLM's)."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)


def check_limits(req: SamplingFields, limits: RequestLimits, num_prompts: int = 1) -> None:
    """InvalidRequestError when a request asks for more work than ``limits`` allow."""
    if num_prompts > limits.max_prompts:
        raise InvalidRequestError(f"at most {limits.max_prompts} prompts per request, got {num_prompts}",
                                  param="prompt")
    stops = req.stops
    if len(stops) > limits.max_stop_strings:
        raise InvalidRequestError(f"at most {limits.max_stop_strings} stop sequences, got {len(stops)}", param="stop")
    total = sum(len(s) for s in stops)
    if total > limits.max_stop_chars:
        raise InvalidRequestError(f"the stop sequences may hold at most {limits.max_stop_chars} characters in all, "
                                  f"got {total}", param="stop")
